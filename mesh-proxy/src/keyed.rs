//! State kept per name (a circuit per upstream service, a concurrency
//! limit per service or method), made on first use and read without a
//! lock. The names come from the registry and config, never from a
//! caller's request alone, and there are at most [`MAX_KEYS`] of them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Most names one table keeps.
pub const MAX_KEYS: usize = 4096;

/// The table was full.
#[derive(Debug, thiserror::Error)]
#[error("this proxy already keeps {what} for {MAX_KEYS} names, its most; {key} gets none")]
pub struct Full {
    what: &'static str,
    key: String,
}

impl Full {
    /// The answer to a call that needed a place in the table.
    pub fn answer(&self) -> Box<crate::layer::Answer> {
        Box::new(crate::grpc::status_response(
            tonic::Code::ResourceExhausted,
            &self.to_string(),
        ))
    }
}

/// State of type `T` per name.
#[derive(Debug)]
pub struct Keyed<T> {
    what: &'static str,
    map: ArcSwap<HashMap<String, Arc<T>>>,
}

impl<T> Keyed<T> {
    /// An empty table of `what` (for errors: "circuits").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            map: ArcSwap::default(),
        }
    }

    /// The state of `key` if `current` says it is still right (it was made
    /// for the settings in force), else a new one from `make`, which
    /// replaces it.
    pub fn get(
        &self,
        key: &str,
        current: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Result<Arc<T>, Full> {
        if let Some(state) = self.map.load().get(key).filter(|s| current(s)) {
            return Ok(state.clone());
        }
        let made = Arc::new(make());
        let mut full = false;
        let mut result = made.clone();
        self.map.rcu(|map| {
            full = false;
            let mut next = HashMap::clone(map);
            match next.get(key).filter(|s| current(s)) {
                // Another call made it first: use theirs.
                Some(theirs) => result = theirs.clone(),
                None if next.len() >= MAX_KEYS && !next.contains_key(key) => full = true,
                None => {
                    result = made.clone();
                    next.insert(key.to_owned(), made.clone());
                }
            }
            next
        });
        if full {
            return Err(Full {
                what: self.what,
                key: key.to_owned(),
            });
        }
        Ok(result)
    }
}

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Self::new("state")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_kept_replaced_when_stale_and_bounded() {
        let table: Keyed<u32> = Keyed::new("counters");
        let a = table.get("a", |v| *v == 1, || 1).unwrap();
        assert!(Arc::ptr_eq(&a, &table.get("a", |v| *v == 1, || 9).unwrap()));
        let b = table.get("a", |v| *v == 2, || 2).unwrap();
        assert_eq!(*b, 2);
        for i in 1..MAX_KEYS {
            table.get(&format!("k{i}"), |_| true, || 0).unwrap();
        }
        let full = table.get("one-too-many", |_| true, || 0).unwrap_err();
        assert!(full.to_string().contains("counters"), "{full}");
        assert!(
            table.get("a", |_| true, || 0).is_ok(),
            "known names still work"
        );
    }
}
