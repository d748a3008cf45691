//! Label selectors as `?labelSelector=` brings them. Nothing may panic; a selector that parses
//! must match a set of labels without panicking either.
#![no_main]

use std::collections::BTreeMap;

use ceccm_controller::selector::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(selector) = Selector::parse(text) else {
        return;
    };
    let labels: BTreeMap<String, String> = [("app", "m51"), ("tier", "edge"), ("site", "")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = selector.matches(&labels);
    let _ = selector.matches(&BTreeMap::new());
});
