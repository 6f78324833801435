//! A policy that imports filesystem access (an interface shaped like WASI's `preopens`), which
//! the host does not provide. The host must refuse to load it, with an error naming the import.

#![allow(missing_docs, reason = "the bindings wit_bindgen generates carry no docs")]

wit_bindgen::generate!({
    path: "../../wit",
    inline: "
        package wasi:filesystem@0.2.0;

        interface preopens {
            /// The directories the guest may open: exactly what a policy must never reach.
            get-directories: func() -> list<string>;
        }

        world bad-import {
            include sandgate:policy/authorizer@0.1.0;
            import preopens;
        }
    ",
    world: "wasi:filesystem/bad-import@0.2.0",
    generate_all,
});

use exports::sandgate::policy::policy::Guest;
use sandgate::policy::types::{AllowResponse, CheckRequest, Decision};

struct Exfiltrate;

impl Guest for Exfiltrate {
    fn check(request: CheckRequest) -> Decision {
        let directories = wasi::filesystem::preopens::get_directories();
        std::hint::black_box((directories, request.path));
        Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: Vec::new() })
    }
}

export!(Exfiltrate);
