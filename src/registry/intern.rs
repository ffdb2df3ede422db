//! Reference-counted string interning: strings that repeat across instances
//! (serviceId, version, envTag, protocol, tag sets) are stored once and
//! records hold a 4-byte `Sym`. A string is freed when its last holder
//! releases it, so a stream of unique names cannot grow the table forever.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(u32);

impl Sym {
    /// The number inside, for a key that must hold it as a plain integer
    /// for a while (a sorted listing's entries).
    pub(super) fn raw(self) -> u32 {
        self.0
    }

    pub(super) fn from_raw(raw: u32) -> Sym {
        Sym(raw)
    }
}

struct Slot {
    text: Arc<str>,
    refs: u32,
}

#[derive(Default)]
pub struct Interner {
    /// Changes whenever a string is added or freed.
    generation: u64,
    ids: HashMap<Arc<str>, u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
}

impl Interner {
    /// Returns the symbol for `text`, taking one reference.
    pub fn intern(&mut self, text: &str) -> Sym {
        if let Some(&id) = self.ids.get(text) {
            let slot = self.slots[id as usize]
                .as_mut()
                .expect("mapped ids are live");
            slot.refs += 1;
            return Sym(id);
        }
        self.generation += 1;
        let text: Arc<str> = Arc::from(text);
        let slot = Some(Slot {
            text: text.clone(),
            refs: 1,
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(text, id);
        Sym(id)
    }

    /// Takes one more reference to a live symbol.
    pub fn retain(&mut self, sym: Sym) {
        self.slots[sym.0 as usize]
            .as_mut()
            .expect("retain of a released symbol")
            .refs += 1;
    }

    /// Drops one reference; the string is freed with the last one.
    pub fn release(&mut self, sym: Sym) {
        let slot = self.slots[sym.0 as usize]
            .as_mut()
            .expect("release of a released symbol");
        slot.refs -= 1;
        if slot.refs == 0 {
            let slot = self.slots[sym.0 as usize].take().expect("checked above");
            self.ids.remove(&slot.text);
            self.free.push(sym.0);
            self.generation += 1;
        }
    }

    /// The symbol for `text` if it is interned; takes no reference.
    pub fn find(&self, text: &str) -> Option<Sym> {
        self.ids.get(text).map(|&id| Sym(id))
    }

    pub fn resolve(&self, sym: Sym) -> &Arc<str> {
        &self.slots[sym.0 as usize]
            .as_ref()
            .expect("resolve of a released symbol")
            .text
    }

    /// Changes whenever a string is added or freed (symbols may be reused).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every live string with its symbol.
    pub fn iter(&self) -> impl Iterator<Item = (Sym, &Arc<str>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (Sym(i as u32), &s.text)))
    }

    /// Distinct strings held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_frees_by_reference_count() {
        let mut strings = Interner::default();
        let a = strings.intern("user-service");
        let b = strings.intern("user-service");
        assert_eq!(a, b);
        assert_eq!(&**strings.resolve(a), "user-service");
        strings.release(a);
        assert_eq!(strings.find("user-service"), Some(a));
        strings.release(b);
        assert_eq!(strings.find("user-service"), None);
        assert!(strings.is_empty());
        // The slot is reused.
        let c = strings.intern("other");
        assert_eq!(c, a);
    }
}
