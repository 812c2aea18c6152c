//! Cancellation that reaches inside a step. A render sets the flag it answers to (Ctrl-C for
//! `reel generate`, DELETE and shutdown for `reel serve`) for its thread with [`scope`]; the
//! long loops check it between units of work: the DiT between blocks, the cpu attention
//! between query tiles (on the pool's threads, through the [`Token`] taken on the calling
//! thread), the decode between chunks. A cancelled run stops with [`Error::Interrupted`]
//! and drops everything it allocated on the way out.

use std::cell::RefCell;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Whether the work should stop.
pub type Flag = Arc<dyn Fn() -> bool + Send + Sync>;

thread_local! {
    static CURRENT: RefCell<Option<Flag>> = const { RefCell::new(None) };
}

/// The calling thread's flag, to check from other threads (a parallel loop's workers).
#[derive(Clone, Default)]
pub struct Token(Option<Flag>);

impl Token {
    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f())
    }

    /// Err(Interrupted) once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// The calling thread's token (never cancelled outside a [`scope`]).
pub fn current() -> Token {
    Token(CURRENT.with(|c| c.borrow().clone()))
}

/// Err(Interrupted) when the calling thread's work has been cancelled.
pub fn check() -> Result<()> {
    current().check()
}

/// Restores the thread's previous flag when dropped.
pub struct Scope {
    prev: Option<Flag>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Makes `flag` the calling thread's until the returned guard drops (None: no flag).
pub fn scope(flag: Option<Flag>) -> Scope {
    Scope {
        prev: CURRENT.with(|c| c.replace(flag)),
    }
}
