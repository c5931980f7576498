//! A one-place mailbox between two threads that spin before they sleep.
//!
//! The partitions of a window run side by side and meet at its end, a
//! millisecond or so of work later, some 720,000 times in a simulated hour
//! (windows of 5 ms). A thread that goes to sleep at each meeting costs a
//! wake-up in the kernel (tens of microseconds) every time, more than the
//! wait itself; one that spins a little is there when the other arrives.
//! After [`SPIN`] it parks, so a thread left waiting long (the other one
//! ran the serial part of a window, or the machine is busy) gives its core
//! back.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a receiver spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// Bits of [`Handoff::state`].
const FULL: u8 = 1;
const CLOSED: u8 = 2;

/// Carries one value at a time from a sender to the thread `receiver`.
pub(crate) struct Handoff<T> {
    state: AtomicU8,
    value: Mutex<Option<T>>,
    receiver: Thread,
}

impl<T> Handoff<T> {
    /// A mailbox whose values `receiver` takes.
    pub(crate) fn new(receiver: Thread) -> Self {
        Handoff {
            state: AtomicU8::new(0),
            value: Mutex::new(None),
            receiver,
        }
    }

    /// Hands `value` over (the last one must have been received) and wakes
    /// the receiver if it sleeps.
    pub(crate) fn send(&self, value: T) {
        let previous = self
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(value);
        debug_assert!(previous.is_none(), "a value handed over twice");
        self.state.fetch_or(FULL, Ordering::Release);
        self.receiver.unpark();
    }

    /// Tells the receiver no more values come: once it took the last one,
    /// its `recv` returns `None`.
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::Release);
        self.receiver.unpark();
    }

    /// Waits for the next value, or `None` once the mailbox is closed. Only
    /// the thread named at [`Handoff::new`] may call it (it parks).
    pub(crate) fn recv(&self) -> Option<T> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state & FULL != 0 {
                break;
            }
            if state & CLOSED != 0 {
                return None;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock costs some 20 ns: every 64 rounds.
            if spins & 63 != 0 || start.elapsed() < SPIN {
                spin_loop();
            } else {
                // A token from an unpark since the last look makes this
                // return at once: no wake-up is lost.
                thread::park();
            }
        }
        self.state.fetch_and(!FULL, Ordering::Relaxed);
        self.value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Closes a mailbox when dropped, also when its sender unwinds: a thread
/// waiting for a value from one that panicked must not wait forever.
pub(crate) struct CloseOnDrop<'a, T>(pub(crate) &'a Handoff<T>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cross_in_order_and_close_ends_the_stream() {
        // A round trip of many values, both sides waiting in turn: some
        // values arrive while the other side spins, some once it parked.
        let back = Handoff::new(thread::current());
        thread::scope(|s| {
            let (mailbox_tx, mailbox) = std::sync::mpsc::channel();
            let back = &back;
            s.spawn(move || {
                let _close = CloseOnDrop(back);
                let jobs = std::sync::Arc::new(Handoff::<u32>::new(thread::current()));
                mailbox_tx.send(std::sync::Arc::clone(&jobs)).unwrap();
                while let Some(x) = jobs.recv() {
                    if x % 100 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                    back.send(x * 2);
                }
            });
            let jobs = mailbox.recv().unwrap();
            for x in 0..1000u32 {
                jobs.send(x);
                assert_eq!(back.recv(), Some(x * 2));
                if x % 100 == 50 {
                    // The worker parks while this one is away.
                    thread::sleep(Duration::from_millis(1));
                }
            }
            jobs.close();
        });
        // The worker closed its side as it ended.
        assert_eq!(back.recv(), None);
    }

    #[test]
    fn a_value_sent_before_close_is_still_received() {
        let mailbox = Handoff::new(thread::current());
        mailbox.send(7u8);
        mailbox.close();
        assert_eq!(mailbox.recv(), Some(7));
        assert_eq!(mailbox.recv(), None);
    }

    #[test]
    fn a_panicking_sender_wakes_the_receiver() {
        let back: Handoff<u32> = Handoff::new(thread::current());
        let outcome = thread::scope(|s| {
            let worker = s.spawn(|| {
                let _close = CloseOnDrop(&back);
                panic!("the sender fails");
            });
            let got = back.recv();
            (got, worker.join().is_err())
        });
        assert_eq!(outcome, (None, true));
    }
}
