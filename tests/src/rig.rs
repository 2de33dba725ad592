//! The usual set-up of a privileged test: a lab, a responder on the watched port,
//! and the agent with the test's flags.

use crate::{
    agent::Agent,
    lab::{require_root, Lab},
    responder::Responder,
};
use std::time::Duration;

/// A lab with a responder and a running agent. Dropped in reverse order of
/// the fields when destructured (agent, responder, then the namespaces).
pub struct Rig {
    pub lab: Lab,
    pub resp: Responder,
    pub agent: Agent,
}

pub struct RigBuilder {
    args: Vec<String>,
    port: u16,
    greet: Duration,
}

impl Rig {
    /// An agent started with `args`; a responder on port 25 that greets at once
    /// (change with `port` and `greet`).
    pub fn builder(args: &[&str]) -> RigBuilder {
        RigBuilder {
            args: args.iter().map(|a| a.to_string()).collect(),
            port: 25,
            greet: Duration::ZERO,
        }
    }

    pub fn into_parts(self) -> (Lab, Responder, Agent) {
        (self.lab, self.resp, self.agent)
    }
}

impl RigBuilder {
    /// The responder's port (the agent watches 25 unless its flags say otherwise).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// How long the responder waits after accept before it greets.
    pub fn greet(mut self, delay: Duration) -> Self {
        self.greet = delay;
        self
    }

    /// Builds it all, or fails the test saying which part did not come up.
    pub fn start(self) -> Rig {
        require_root();
        let lab = Lab::new().expect("lab");
        let resp = Responder::start(&lab, self.port, self.greet).expect("responder");
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let agent = Agent::start(&lab, &args).expect("agent");
        Rig { lab, resp, agent }
    }
}
