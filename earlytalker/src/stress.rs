//! A wait that adapts to load, like postscreen's `postscreen_greet_wait =
//! ${stress?{2}:{6}}s`: while the kernel's connection tables or the MTA's
//! listen queue are filling up, new connections are held for the shorter
//! `wait_under_stress`, so held clients give up their place sooner.
//!
//! Stress begins when either fill reaches the threshold and ends only when both
//! are below 80 % of it: one line each way, not one per tick at the edge.

/// Where stress ends, as a share of the threshold where it begins.
const HYSTERESIS: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    /// Entries in the kernel's connection and half-open tables over their size.
    pub table: f64,
    /// The fullest accept queue of a watched port's listeners over its size.
    pub queue: f64,
}

impl Fill {
    fn most(&self) -> f64 {
        self.table.max(self.queue)
    }
}

#[derive(Debug, Default)]
pub struct Stress {
    on: bool,
}

impl Stress {
    pub fn on(&self) -> bool {
        self.on
    }

    /// Back to a state (when applying the change failed).
    pub fn set(&mut self, on: bool) {
        self.on = on;
    }

    /// Takes the latest fill; Some(new state) when it changes.
    pub fn update(&mut self, fill: Fill, threshold: f64) -> Option<bool> {
        let next = if self.on {
            fill.most() >= threshold * HYSTERESIS
        } else {
            fill.most() >= threshold
        };
        if next == self.on {
            return None;
        }
        self.on = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(table: f64, queue: f64) -> Fill {
        Fill { table, queue }
    }

    #[test]
    fn enters_at_the_threshold_and_leaves_below_its_hysteresis() {
        let mut s = Stress::default();
        assert_eq!(s.update(f(0.5, 0.1), 0.75), None);
        // Either fill is enough.
        assert_eq!(s.update(f(0.1, 0.8), 0.75), Some(true));
        assert_eq!(s.update(f(0.7, 0.0), 0.75), None, "still above 80 % of it");
        assert!(s.on());
        assert_eq!(s.update(f(0.59, 0.59), 0.75), Some(false));
        assert_eq!(s.update(f(0.7, 0.0), 0.75), None, "not yet back");
        assert_eq!(s.update(f(0.75, 0.0), 0.75), Some(true));
    }
}
