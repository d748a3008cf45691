//! Integration tests of astro-fit (one test binary; one module per area).

mod cli;
mod fit_core;
mod ppxf_compare;
