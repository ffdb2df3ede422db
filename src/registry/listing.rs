//! Listing and search for the admin plane: pages filtered by serviceId,
//! envTag, status and a substring, scanned a chunk of slots at a time so
//! the caller can let go of the lock between chunks.

use super::*;

/// What an admin listing asks for (every field optional).
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<Status>,
    pub q: Option<String>,
}

/// A listing in progress (see `Registry::page_step`).
pub struct PageScan {
    query: Query,
    cursor: u32,
    limit: usize,
    next_slot: u32,
    q_syms: HashSet<Sym>,
    /// The interner generation `q_syms` was computed at.
    q_generation: Option<u64>,
    page: Page,
    done: bool,
}

impl PageScan {
    pub fn new(query: Query, cursor: u32, limit: usize) -> PageScan {
        PageScan {
            query,
            cursor,
            limit,
            next_slot: 0,
            q_syms: HashSet::new(),
            q_generation: None,
            page: Page {
                total: 0,
                items: Vec::new(),
                next: None,
            },
            done: false,
        }
    }

    pub fn finish(self) -> Page {
        self.page
    }
}

#[derive(Debug)]
pub struct Page {
    pub total: usize,
    pub items: Vec<Node>,
    /// The cursor of the next page, if there is one.
    pub next: Option<u32>,
}

/// Case-insensitive (ASCII) substring test, without allocating.
pub(super) fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Formats into a stack buffer (addresses fit in 64 bytes).
pub(super) fn format_into<'a>(buf: &'a mut [u8; 64], args: std::fmt::Arguments<'_>) -> &'a str {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, args);
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

impl Registry {
    /// Every record, up and down, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().map(|(_, i)| i)
    }

    /// One page of the records matching `query`, from slot `cursor` on, at
    /// most `limit`; `total` counts every match. In one go: for long scans
    /// use `PageScan` with `page_step`, which lets go of the registry
    /// between chunks.
    pub fn page(&self, query: &Query, cursor: u32, limit: usize) -> Page {
        let mut scan = PageScan::new(query.clone(), cursor, limit);
        while !self.page_step(&mut scan, u32::MAX) {}
        scan.finish()
    }

    /// Advances `scan` over at most `max_slots` slots; true when it is done.
    /// Filters on serviceId and envTag compare interned ids; `q` is a
    /// case-insensitive substring of the serviceId, envTag, version,
    /// address, tags or runtimeInstanceId.
    pub fn page_step(&self, scan: &mut PageScan, max_slots: u32) -> bool {
        if scan.done {
            return true;
        }
        let sym = |s: &Option<String>| match s {
            None => Some(None),
            Some(text) => self.strings.find(text).map(Some),
        };
        let query = &scan.query;
        let (Some(service), Some(env)) = (sym(&query.service_id), sym(&query.env_tag)) else {
            // Nothing can match a name nobody uses.
            scan.page = Page {
                total: 0,
                items: Vec::new(),
                next: None,
            };
            scan.done = true;
            return true;
        };
        let q = query.q.as_deref().filter(|q| !q.is_empty());
        // Interned strings are tested against `q` once, not once per record
        // (again only if strings came or went since the last step).
        if let Some(q) = q
            && scan.q_generation != Some(self.strings.generation())
        {
            scan.q_syms = self
                .strings
                .iter()
                .filter(|(_, text)| contains_ignore_case(text, q))
                .map(|(s, _)| s)
                .collect();
            scan.q_generation = Some(self.strings.generation());
        }
        let q_syms = &scan.q_syms;
        let matches = |i: &Instance| {
            service.is_none_or(|s| s == i.service)
                && env.is_none_or(|e| e == i.env)
                && query.status.is_none_or(|st| st == i.status)
                && q.is_none_or(|q| self.contains(i, q, q_syms))
        };
        let unfiltered =
            service.is_none() && env.is_none() && query.status.is_none() && q.is_none();
        let end = scan
            .next_slot
            .saturating_add(max_slots)
            .min(self.high_water);
        let page = &mut scan.page;
        for slot in scan.next_slot..end {
            let Some(i) = self.instances.get(slot as usize) else {
                continue;
            };
            if !matches(i) {
                continue;
            }
            if slot >= scan.cursor {
                if page.items.len() < scan.limit {
                    page.items.push(self.node(i));
                } else if page.next.is_none() {
                    page.next = Some(slot);
                    if unfiltered {
                        scan.next_slot = self.high_water;
                        break;
                    }
                }
            }
            if !unfiltered {
                page.total += 1;
            }
        }
        scan.next_slot = scan.next_slot.max(end);
        if unfiltered {
            page.total = self.instances.len();
        }
        scan.done = scan.next_slot >= self.high_water;
        scan.done
    }

    /// Whether `q` is in one of the record's strings (`q_syms`: the interned
    /// strings that hold it), its address or its id. No allocation.
    pub(super) fn contains(&self, i: &Instance, q: &str, q_syms: &HashSet<Sym>) -> bool {
        if [i.service, i.env, i.version, i.tags]
            .iter()
            .any(|s| q_syms.contains(s))
        {
            return true;
        }
        let mut buf = [0u8; 64];
        let address: &str = match i.address {
            Address::Host(h) => {
                return q_syms.contains(&h)
                    || contains_ignore_case(i.id.hyphenated().encode_lower(&mut buf), q);
            }
            Address::V4(v4) => format_into(&mut buf, format_args!("{v4}")),
            Address::V6(v6) => format_into(&mut buf, format_args!("{v6}")),
        };
        if contains_ignore_case(address, q) {
            return true;
        }
        contains_ignore_case(i.id.hyphenated().encode_lower(&mut buf), q)
    }
}
