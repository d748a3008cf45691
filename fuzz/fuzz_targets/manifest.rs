//! A request body as the API reads it: the nesting check, JSON or YAML (the first byte picks),
//! then the typed manifest of each kind. Nothing may panic, and a too-deep document must be
//! refused before the parser sees it.
#![no_main]

use ceccm_controller::api::parse_document;
use ceccm_controller::resources::{Kind, parse_submitted};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let yaml = choice & 1 == 1;
    let Ok(value) = parse_document(body, yaml) else {
        return;
    };
    for kind in [Kind::Region, Kind::Application, Kind::Dataset] {
        let _ = parse_submitted(kind, value.clone());
    }
});
