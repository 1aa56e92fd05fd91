//! Weft's Kubernetes custom resources (group `mesh.weft.dev`, version `v1alpha1`), their
//! validation, and the generator of the CRD YAML the Helm chart installs.
//!
//! What it does:
//! - [`types`]: [`TrafficRoute`], [`TrafficPolicy`] and [`ExternalService`], written with
//!   kube's `CustomResource` derive. Their specs reuse the registry's own types
//!   (`weft_registry::model`), so every field is spelt and means what it does in a registry
//!   file (`docs/registry-schema.md`); `TrafficRouteSpec` is the registry `Route` minus
//!   `name`, `TrafficPolicySpec` the `Policy` minus `name`, `ExternalServiceSpec` the
//!   `ServiceSpec` minus `name`. The OpenAPI schema (`CustomResourceExt::crd()`) is
//!   structural: durations are strings with a humantime pattern, enums are strings with
//!   `enum`, optional fields are `nullable`.
//! - [`status`]: the status all three share (`observedGeneration`, `conditions`) and helpers
//!   for the `Accepted`, `ResolvedRefs` and `Programmed` conditions ([`accepted`], [`resolved_refs`], [`programmed`],
//!   [`set_condition`]).
//! - [`validate`]: [`validate_route`], [`validate_policy`], [`validate_external_service`]:
//!   spec in, registry value out, checked by the registry's own validator; errors name the
//!   object and field (`TrafficRoute default/web: spec.rules[0].backends[1].weight: ...`).
//! - [`generate`]: renders the CRDs into `charts/weft/crds/` (the `weft-crds` binary, run by
//!   `make crds`), and checks the checked-in files for drift.
//!
//! Names in the registry:
//! - A `TrafficRoute` or `TrafficPolicy` `<name>` in namespace `<ns>` becomes the route or
//!   policy `<ns>.<name>` ([`registry_name`]). Namespaces hold no `.`, so this never
//!   collides.
//! - An `ExternalService` `<name>` in `<ns>` declares the service `<name>.<ns>`
//!   ([`service_name`]), shaped like the Kubernetes Service DNS name clients use.
//! - Service references inside specs (`service`, `backends[].service`) are used verbatim.
//! - When the combined name is not a valid registry name (longer than 253 characters: a
//!   Kubernetes namespace and name together may reach 317), the object is refused with an
//!   error on `metadata.name` instead of being shortened into a name that could collide.
//!
//! What it does not do: talk to a cluster. Watching these objects and writing their status is
//! `weft-source-kubernetes`'s job.

pub mod generate;
pub mod status;
pub mod types;
pub mod validate;

pub use status::*;
pub use types::*;
pub use validate::*;
