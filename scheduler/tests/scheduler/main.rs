//! Integration tests of ceccm-scheduler: one test binary, one module per area.

mod placement_properties;
mod sim;
