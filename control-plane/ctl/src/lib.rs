//! weftctl, the operator CLI of a Weft control plane: what each proxy was sent and whether it
//! took it, which resources proxies reject and why, the endpoints of a service, and offline
//! validation of registry files and CRD YAML.
//!
//! What it does:
//! - [`admin`]: reads the admin port's JSON debug pages (`/debug/clients`,
//!   `/debug/proxy_config`, `/debug/endpoints`; `docs/admin.md`), with errors naming the URL.
//! - [`docs`]: those documents as lenient types, so an older or newer server still renders.
//! - [`render`]: the `status`, `config` and `endpoints` tables (pure; the clock is passed in).
//! - [`validate`]: registry files and CRD documents checked by the control plane's own code
//!   (`weft-source-file`, `weft-registry`, `weft-crds`), never a copy of it.
//!
//! What it does not do: change anything. It has no write path to the control plane, a
//! registry or a cluster; every command is a read or an offline check. It keeps no state
//! between runs and does not talk xDS.

pub mod admin;
pub mod docs;
pub mod render;
pub mod table;
pub mod validate;
