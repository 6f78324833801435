//! A policy that tries to reach the network. Built for `wasm32-wasip2`, its standard library
//! imports `wasi:sockets`, which Sandgate does not link: the host refuses it at load, naming
//! the import, before any check could run it.

use sandgate_policy_sdk::{Decision, DecisionExt, Policy, Request, allow, deny};

/// Connects to 127.0.0.1:1 and reports what happened.
pub struct HostileSocket;

impl Policy for HostileSocket {
    fn check(_: &Request) -> Decision {
        match std::net::TcpStream::connect("127.0.0.1:1") {
            Ok(_) => allow().set_header("x-connected", "yes"),
            Err(_) => deny(403, "no_network"),
        }
    }
}

sandgate_policy_sdk::export_policy!(HostileSocket);
