//! The seam between the control plane and the data plane: a latest-value
//! snapshot that one side publishes and the other reads.
//!
//! A control-plane source (the agent's HTTP API today, xDS later) builds a
//! complete value, validates it, and only then publishes it whole; readers
//! take the latest one per connection and never hold it across a decision
//! that could see a newer one. Nothing is ever half-applied, and a burst of
//! publications can neither queue up nor be partly seen (latest wins).
//!
//! This module sits below both planes so that the data plane can read
//! snapshots without importing anything of the control plane. It is the
//! shape of linkerd2-proxy's credential store (`meshtls/creds`): a
//! publisher that validates, receivers that only read.

use std::sync::Arc;

use tokio::sync::watch;

/// Called with every published value and whether it is the first; used for
/// the metric and log line of each change.
type Hook<T> = Box<dyn Fn(&T, bool) + Send + Sync>;

/// Publishes snapshots of `T`. Shared as `Arc<Publisher<T>>` by whoever may
/// publish (a watcher, the supervisor for values from files or tests).
pub struct Publisher<T> {
    /// The latest value; `None` until the first is published.
    tx: watch::Sender<Option<Arc<T>>>,
    on_publish: Option<Hook<T>>,
}

/// Reads the latest snapshot of `T`. Cheap to clone.
pub struct Receiver<T> {
    rx: watch::Receiver<Option<Arc<T>>>,
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Receiver {
            rx: self.rx.clone(),
        }
    }
}

impl<T> Default for Publisher<T> {
    fn default() -> Self {
        Publisher {
            tx: watch::channel(None).0,
            on_publish: None,
        }
    }
}

impl<T> Publisher<T> {
    /// A publisher with nothing published yet.
    pub fn new() -> Publisher<T> {
        Publisher::default()
    }

    /// Runs `hook` on every publication (with `true` for the first).
    pub fn on_publish(mut self, hook: impl Fn(&T, bool) + Send + Sync + 'static) -> Publisher<T> {
        self.on_publish = Some(Box::new(hook));
        self
    }

    /// Makes `value` the snapshot every reader sees from now on.
    pub fn publish(&self, value: Arc<T>) {
        let first = self.tx.borrow().is_none();
        if let Some(hook) = &self.on_publish {
            hook(&value, first);
        }
        self.tx.send_replace(Some(value));
    }

    /// Publishes `value` unless it equals the current snapshot; says
    /// whether it did. Watchers whose source answers "maybe changed" use it.
    pub fn publish_if_changed(&self, value: T) -> bool
    where
        T: PartialEq,
    {
        if self.tx.borrow().as_deref() == Some(&value) {
            return false;
        }
        self.publish(Arc::new(value));
        true
    }

    /// A reader of this publisher's snapshots.
    pub fn subscribe(&self) -> Receiver<T> {
        Receiver {
            rx: self.tx.subscribe(),
        }
    }
}

impl<T> Receiver<T> {
    /// The latest snapshot, if one has been published.
    pub fn latest(&self) -> Option<Arc<T>> {
        self.rx.borrow().clone()
    }

    /// Waits until a snapshot is published, then returns the latest one.
    /// `None` if the publisher went away before publishing anything.
    /// Cancel-safe.
    pub async fn ready(&mut self) -> Option<Arc<T>> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        }
    }

    /// Waits for a snapshot newer than the last one this receiver returned
    /// from `changed` or `ready`. `None` once the publisher is gone.
    pub async fn changed(&mut self) -> Option<Arc<T>> {
        loop {
            self.rx.changed().await.ok()?;
            if let Some(v) = self.rx.borrow_and_update().clone() {
                return Some(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn readers_see_the_latest_and_wait_for_the_first() {
        let firsts = Arc::new(AtomicUsize::new(0));
        let later = Arc::new(AtomicUsize::new(0));
        let (f, l) = (firsts.clone(), later.clone());
        let publisher = Publisher::new().on_publish(move |_: &u32, first| {
            if first { &f } else { &l }.fetch_add(1, Ordering::Relaxed);
        });
        let mut rx = publisher.subscribe();
        assert_eq!(rx.latest(), None, "nothing before the first publication");
        let waiting = tokio::spawn({
            let mut rx = rx.clone();
            async move { rx.ready().await }
        });
        publisher.publish(Arc::new(1));
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&1));
        publisher.publish(Arc::new(2));
        publisher.publish(Arc::new(3));
        assert_eq!(rx.changed().await.as_deref(), Some(&3), "latest wins");
        assert_eq!(rx.latest().as_deref(), Some(&3));
        assert_eq!(firsts.load(Ordering::Relaxed), 1);
        assert_eq!(later.load(Ordering::Relaxed), 2);
        assert!(
            !publisher.publish_if_changed(3),
            "same value: nothing published"
        );
        assert!(publisher.publish_if_changed(4));
        assert_eq!(later.load(Ordering::Relaxed), 3);
        assert_eq!(rx.changed().await.as_deref(), Some(&4));
        drop(publisher);
        assert_eq!(rx.changed().await, None, "publisher gone");
    }
}
