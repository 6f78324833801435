//! Host bindings generated from `wit/policy.wit`, the one place `bindgen!` runs.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "authorizer",
    path: "../wit",
    additional_derives: [PartialEq, Eq],
});
