//! Bounded queues into a shard, woken by the shard's eventfd. The admin
//! plane, other shards and the controller post; only the owning shard takes.
//!
//! The eventfd is written only when a queue goes from empty to non-empty,
//! so a burst of messages costs one wake-up.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Mutex;

use super::sys;

pub struct Mailbox<M> {
    queue: Mutex<VecDeque<M>>,
    wake_fd: RawFd,
    capacity: usize,
}

/// The queue is at its bound; the message comes back to the caller.
#[derive(Debug)]
pub struct Full<M>(pub M);

impl<M> Mailbox<M> {
    pub fn new(capacity: usize) -> std::io::Result<Mailbox<M>> {
        Ok(Mailbox {
            queue: Mutex::new(VecDeque::new()),
            wake_fd: sys::eventfd()?,
            capacity,
        })
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake_fd
    }

    pub fn post(&self, msg: M) -> Result<(), Full<M>> {
        let was_empty = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.capacity {
                return Err(Full(msg));
            }
            q.push_back(msg);
            q.len() == 1
        };
        if was_empty {
            sys::eventfd_wake(self.wake_fd);
        }
        Ok(())
    }

    /// Wakes the owner without a message (e.g. to see a stop flag).
    pub fn wake(&self) {
        sys::eventfd_wake(self.wake_fd);
    }

    /// Moves every queued message into `into` (the owner's reusable deque).
    pub fn take_all(&self, into: &mut VecDeque<M>) {
        sys::eventfd_drain(self.wake_fd);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *q, into);
    }
}

impl<M> Drop for Mailbox<M> {
    fn drop(&mut self) {
        sys::close(self.wake_fd);
    }
}
