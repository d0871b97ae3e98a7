//! Stop strings over streamed text.
//!
//! Text that could still turn into a stop string is held back until the next delta settles
//! it; when a stop string appears, everything before it is released and the stream ends. The
//! stop string itself is never sent, as in OpenAI's API.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

/// What to send after a delta, and whether a stop string ended the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    pub text: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                text: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopStep {
                text,
                stopped: true,
            };
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep {
            text,
            stopped: false,
        }
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && p.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    /// Releases held-back text at the end of the stream.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool, Vec<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut sent = Vec::new();
        for d in deltas {
            let step = m.push(d);
            sent.push(step.text.clone());
            out.push_str(&step.text);
            if step.stopped {
                return (out, true, sent);
            }
        }
        out.push_str(&m.finish());
        (out, false, sent)
    }

    #[test]
    fn stop_split_across_deltas_is_held_then_cut() {
        let (out, stopped, sent) = run(&["END"], &["hello E", "N", "D world"]);
        assert_eq!(out, "hello ");
        assert!(stopped);
        assert_eq!(sent[0], "hello ", "the 'E' is held back");
        assert_eq!(sent[1], "");
    }

    #[test]
    fn false_alarm_is_released() {
        let (out, stopped, sent) = run(&["END"], &["a E", "Nx", " b"]);
        assert_eq!(out, "a ENx b");
        assert!(!stopped);
        assert_eq!(sent[1], "ENx");
    }

    #[test]
    fn earliest_stop_wins_and_unicode_is_safe() {
        let (out, stopped, _) = run(&["é!", "zz"], &["café", "!zz"]);
        assert_eq!(out, "caf");
        assert!(stopped);
        let (out, _, _) = run(&["éé"], &["aé", "b"]);
        assert_eq!(out, "aéb");
    }
}
