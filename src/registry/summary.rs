//! The summary: instances by status and the largest services.

use super::*;

#[derive(Debug)]
pub struct Summary {
    pub up: usize,
    pub down: usize,
    pub distinct_services: usize,
    /// (serviceId, up instances), largest first.
    pub services: Vec<(Arc<str>, usize)>,
}

impl Registry {
    /// Counts by status, and up instances by serviceId (the `top` largest).
    pub fn summary(&self, top: usize) -> Summary {
        let mut services: Vec<(Arc<str>, usize)> = self
            .by_service
            .iter()
            .map(|(s, list)| (self.strings.resolve(*s).clone(), list.len()))
            .collect();
        let distinct_services = services.len();
        services.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        services.truncate(top);
        Summary {
            up: self.len_up(),
            down: self.len_down(),
            distinct_services,
            services,
        }
    }

    /// Distinct strings interned (for memory accounting).
    pub fn interned(&self) -> usize {
        self.strings.len()
    }
}
