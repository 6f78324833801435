//! A policy that imports outgoing HTTP (an interface shaped like WASI's `outgoing-handler`),
//! which the host does not provide. The host must refuse to load it, with an error naming the
//! import.

#![allow(missing_docs, reason = "the bindings wit_bindgen generates carry no docs")]

wit_bindgen::generate!({
    path: "../../wit",
    inline: "
        package wasi:http@0.2.0;

        interface outgoing-handler {
            /// Send a request anywhere: exactly what a policy must never do.
            handle: func(url: string) -> string;
        }

        world bad-import {
            include sandgate:policy/authorizer@0.2.0;
            import outgoing-handler;
        }
    ",
    world: "wasi:http/bad-import@0.2.0",
    generate_all,
});

use exports::sandgate::policy::policy::Guest;
use sandgate::policy::types::{AllowResponse, Decision};

struct Exfiltrate;

impl Guest for Exfiltrate {
    fn check() -> Decision {
        let answer = wasi::http::outgoing_handler::handle(&sandgate::policy::request::path());
        std::hint::black_box(answer);
        Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: Vec::new() })
    }
}

export!(Exfiltrate);
