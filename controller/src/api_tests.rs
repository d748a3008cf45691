//! HTTP tests through `app(state)` and `oneshot`.
