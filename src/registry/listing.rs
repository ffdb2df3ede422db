//! Listing and search for the admin plane: pages filtered by serviceId,
//! envTag, status and a substring, scanned a chunk of slots at a time so
//! the caller can let go of the lock between chunks.
//!
//! Unsorted pages follow slot order and their cursor is a slot. A sorted
//! listing collects a small key per match during the scan (`SortEntry`,
//! 32 bytes, so a listing of N matches holds 32 × N bytes until it
//! answers), orders them with the registry let go (`PageScan::sort`), and
//! takes the registry again only to write the page's records
//! (`Registry::fill_sorted`); its cursor is an offset. A record that went
//! away in between is left out of its page.

use super::*;

/// What an admin listing asks for (every field optional).
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<Status>,
    pub q: Option<String>,
    pub sort: Option<Sort>,
}

/// What a listing is ordered by: the admin item's field it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    ServiceId,
    Status,
    Address,
    Version,
    EnvTag,
    Shard,
    ConnectedAt,
    LastSeenAt,
    Rtt,
}

impl SortKey {
    /// The names `sort=` takes (the admin item's field names).
    pub const NAMES: [(&'static str, SortKey); 9] = [
        ("serviceId", SortKey::ServiceId),
        ("status", SortKey::Status),
        ("address", SortKey::Address),
        ("version", SortKey::Version),
        ("envTag", SortKey::EnvTag),
        ("shard", SortKey::Shard),
        ("connectedAt", SortKey::ConnectedAt),
        ("lastSeenAt", SortKey::LastSeenAt),
        ("rttMs", SortKey::Rtt),
    ];
}

/// An order: a key, ascending unless `descending`. Ties keep slot order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

impl Sort {
    /// `serviceId`, or `-lastSeenAt` for descending; None for an unknown
    /// name.
    pub fn parse(text: &str) -> Option<Sort> {
        let (descending, name) = match text.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, text),
        };
        let (_, key) = SortKey::NAMES.iter().find(|(n, _)| *n == name)?;
        Some(Sort {
            key: *key,
            descending,
        })
    }
}

/// One match of a sorted listing. `rank` first: 1 puts a record after
/// every other whatever the direction (no RTT measured, a host name
/// among IP addresses); then `major` and `minor` in the asked direction,
/// then the slot. For string keys `major[0]` holds the interned string
/// until `PageScan::sort` replaces it with its place in text order.
#[derive(Clone, Copy, Debug)]
struct SortEntry {
    major: [u64; 2],
    minor: u32,
    slot: u32,
    /// The low bits of the record's id: a slot taken by another record
    /// since the scan is told apart.
    check: u32,
    rank: u8,
    /// `major[0]` is a `Sym` still to be ranked.
    named: bool,
}

fn id_check(id: &Uuid) -> u32 {
    id.as_u128() as u32
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
    /// A sorted listing's matches (empty otherwise), then its page.
    sorted: Vec<SortEntry>,
    /// The texts of the strings a sorted listing ranks, taken when the
    /// scan ends.
    texts: HashMap<Sym, Arc<str>>,
    /// Whether `total` counts every match (false: the scan starts at the
    /// cursor and ends with the page, for readers that walk everything).
    counted: bool,
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
            sorted: Vec::new(),
            texts: HashMap::new(),
            counted: true,
        }
    }

    /// A scan that reads from the cursor up to the page's end and leaves
    /// `total` uncounted: walking all N records page by page then costs
    /// O(N), not O(N²/page). Not for sorted listings.
    pub fn uncounted(mut self) -> PageScan {
        assert!(self.query.sort.is_none(), "a sorted page needs every match");
        self.counted = false;
        self.next_slot = self.cursor;
        self
    }

    /// Whether the scan still needs `sort` and `Registry::fill_sorted`.
    pub fn is_sorted(&self) -> bool {
        self.query.sort.is_some()
    }

    /// Orders a finished sorted scan and keeps its page's window; needs no
    /// registry. The window is found with a selection, so a first page
    /// costs O(N), not O(N log N).
    pub fn sort(&mut self) {
        let Some(sort) = self.query.sort else { return };
        debug_assert!(self.done, "sort after the scan");
        let mut order: Vec<(&Arc<str>, Sym)> = self.texts.iter().map(|(s, t)| (t, *s)).collect();
        order.sort_unstable_by(|a, b| {
            let (x, y) = (a.0.as_bytes(), b.0.as_bytes());
            x.to_ascii_lowercase()
                .cmp(&y.to_ascii_lowercase())
                .then(x.cmp(y))
        });
        let place: HashMap<Sym, u64> = order
            .iter()
            .enumerate()
            .map(|(n, (_, s))| (*s, n as u64))
            .collect();
        for e in self.sorted.iter_mut().filter(|e| e.named) {
            // A string released between chunks sorts last among its kind.
            e.major[0] = place
                .get(&Sym::from_raw(e.major[0] as u32))
                .copied()
                .unwrap_or(u64::MAX);
            e.named = false;
        }
        let cmp = |a: &SortEntry, b: &SortEntry| {
            let by_key = (a.major, a.minor).cmp(&(b.major, b.minor));
            let by_key = if sort.descending {
                by_key.reverse()
            } else {
                by_key
            };
            a.rank.cmp(&b.rank).then(by_key).then(a.slot.cmp(&b.slot))
        };
        let total = self.sorted.len();
        let start = (self.cursor as usize).min(total);
        let end = start.saturating_add(self.limit).min(total);
        if end < total {
            self.sorted.select_nth_unstable_by(end, cmp);
            self.sorted.truncate(end);
        }
        self.sorted.sort_unstable_by(cmp);
        self.sorted.drain(..start);
        self.page.total = total;
        self.page.next = (end < total).then_some(end as u32);
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
        if scan.is_sorted() {
            scan.sort();
            self.fill_sorted(&mut scan);
        }
        scan.finish()
    }

    /// Writes a sorted scan's page (after `PageScan::sort`): the records
    /// of its window that are still there.
    pub fn fill_sorted(&self, scan: &mut PageScan) {
        for e in std::mem::take(&mut scan.sorted) {
            if let Some(i) = self.instances.get(e.slot as usize)
                && id_check(&i.id) == e.check
            {
                scan.page.items.push(self.node(i));
            }
        }
    }

    /// A record's key in a sorted listing.
    fn sort_entry(&self, i: &Instance, slot: u32, key: SortKey) -> SortEntry {
        let mut e = SortEntry {
            major: [0; 2],
            minor: 0,
            slot,
            check: id_check(&i.id),
            rank: 0,
            named: false,
        };
        let named = |e: &mut SortEntry, sym: Sym| {
            e.major[0] = sym.raw() as u64;
            e.named = true;
        };
        match key {
            SortKey::ServiceId => named(&mut e, i.service),
            SortKey::Version => named(&mut e, i.version),
            SortKey::EnvTag => named(&mut e, i.env),
            SortKey::Status => e.major[0] = (i.status == Status::Down) as u64,
            SortKey::Shard => e.major[0] = i.owner.shard as u64,
            SortKey::ConnectedAt => e.major[0] = i.connected_at_ms,
            SortKey::LastSeenAt => e.major[0] = i.last_seen_ms,
            SortKey::Rtt => match i.rtt.micros() {
                Some(us) => e.major[0] = us as u64,
                None => e.rank = 1,
            },
            SortKey::Address => {
                e.minor = i.port as u32;
                let bits = match i.address {
                    Address::V4(v4) => v4.to_ipv6_mapped().to_bits(),
                    Address::V6(v6) => v6.to_bits(),
                    Address::Host(h) => {
                        e.rank = 1;
                        named(&mut e, h);
                        return e;
                    }
                };
                e.major = [(bits >> 64) as u64, bits as u64];
            }
        }
        e
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
        let sort = query.sort.map(|s| s.key);
        let unfiltered = service.is_none()
            && env.is_none()
            && query.status.is_none()
            && q.is_none()
            && sort.is_none();
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
            if let Some(key) = sort {
                let entry = self.sort_entry(i, slot, key);
                if entry.named {
                    let sym = Sym::from_raw(entry.major[0] as u32);
                    scan.texts
                        .entry(sym)
                        .or_insert_with(|| self.strings.resolve(sym).clone());
                }
                scan.sorted.push(entry);
                continue;
            }
            if slot >= scan.cursor {
                if page.items.len() < scan.limit {
                    page.items.push(self.node(i));
                } else if page.next.is_none() {
                    page.next = Some(slot);
                    if unfiltered || !scan.counted {
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
