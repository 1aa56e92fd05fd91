//! Services and EndpointSlices as registry objects. Pure: no I/O, so every mapping rule is
//! tested directly.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service as KService, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint as KEndpoint, EndpointSlice};
use weft_registry::schema::is_valid_name;
use weft_registry::{Endpoint, Health, Object, Protocol};

/// Service annotation choosing the port (by name, or by number) whose endpoints are served.
pub const PORT_ANNOTATION: &str = "mesh.weft.dev/port";

/// Label by which an EndpointSlice names its Service (set by Kubernetes' slice controller).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The registry name of a Kubernetes object: `<name>.<namespace>`. Both parts are DNS labels,
/// so the result always passes the registry's name rule; it is also what a client inside the
/// cluster would write as a short host name.
pub fn registry_name(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}")
}

/// Why a Service cannot be served: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ServiceRejected {
    pub field: String,
    pub reason: String,
}

/// The objects one Service stands for: the service itself (with its protocol) and one instance
/// per ready-or-not endpoint address in its slices, at the chosen port.
///
/// ExternalName Services give nothing: they name a host, and EDS carries addresses.
pub fn service_objects(
    svc: &KService,
    slices: &[&EndpointSlice],
    port_name_flag: Option<&str>,
) -> Result<Vec<Object>, ServiceRejected> {
    let meta = &svc.metadata;
    let (Some(name), Some(namespace)) = (meta.name.as_deref(), meta.namespace.as_deref()) else {
        return Err(ServiceRejected {
            field: "metadata".into(),
            reason: "a Service without a name or namespace".into(),
        });
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let service = registry_name(name, namespace);
    if !is_valid_name(&service) {
        return Err(ServiceRejected {
            field: "metadata.name".into(),
            reason: format!("`{service}` is not a valid registry name"),
        });
    }
    let ports = spec.ports.unwrap_or_default();
    let annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(PORT_ANNOTATION))
        .map(String::as_str);
    let chosen = choose_port(&ports, annotation, port_name_flag)?;
    let protocol = chosen.map(protocol_of).unwrap_or_default();
    let mut out = vec![Object::Service {
        name: service.clone(),
        protocol,
    }];
    let Some(chosen) = chosen else {
        // No ports at all (a headless Service may have none): nothing to address.
        return Ok(out);
    };
    let want_name = chosen.name.as_deref().unwrap_or("");
    for slice in slices {
        let slice_name = slice.metadata.name.as_deref().unwrap_or("");
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            // FQDN slices carry host names, which EDS cannot hold.
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == want_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let health = health_of(ep);
            let zone = ep.zone.clone().filter(|z| !z.is_empty());
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                out.push(Object::Instance {
                    service: service.clone(),
                    id: format!("{slice_name}/{address}:{port}"),
                    endpoint: Endpoint {
                        address: ip.to_string(),
                        port,
                        weight: 1,
                        zone: zone.clone(),
                        health,
                        metadata: BTreeMap::new(),
                    },
                });
            }
        }
    }
    Ok(out)
}

/// The Service port whose endpoints are served: the annotation's (by name or number), else
/// the one named by `--kube-port-name` if the Service has it, else the first.
fn choose_port<'a>(
    ports: &'a [ServicePort],
    annotation: Option<&str>,
    flag: Option<&str>,
) -> Result<Option<&'a ServicePort>, ServiceRejected> {
    if let Some(want) = annotation {
        let by_name = ports.iter().find(|p| p.name.as_deref() == Some(want));
        let by_number = want
            .parse::<i32>()
            .ok()
            .and_then(|n| ports.iter().find(|p| p.port == n));
        return match by_name.or(by_number) {
            Some(p) => Ok(Some(p)),
            None => Err(ServiceRejected {
                field: format!("metadata.annotations[{PORT_ANNOTATION}]"),
                reason: format!("the Service has no port named or numbered `{want}`"),
            }),
        };
    }
    if let Some(want) = flag
        && let Some(p) = ports.iter().find(|p| p.name.as_deref() == Some(want))
    {
        return Ok(Some(p));
    }
    Ok(ports.first())
}

/// gRPC when the port says so (`appProtocol`), or by the `grpc*` port naming convention.
fn protocol_of(port: &ServicePort) -> Protocol {
    let app = port
        .app_protocol
        .as_deref()
        .unwrap_or("")
        .to_ascii_lowercase();
    let name = port.name.as_deref().unwrap_or("");
    if app == "grpc" || app == "kubernetes.io/h2c" || name.starts_with("grpc") {
        Protocol::Grpc
    } else {
        Protocol::Http
    }
}

/// Kubernetes' conditions: `ready` unset means ready; `serving` unset means as `ready`;
/// `terminating` unset means not terminating. A terminating endpoint that still serves drains
/// (no new requests, in-flight ones finish); anything else not ready is unhealthy.
fn health_of(ep: &KEndpoint) -> Health {
    let c = ep.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
    let terminating = c.terminating.unwrap_or(false);
    if ready && !terminating {
        Health::Healthy
    } else if serving && terminating {
        Health::Draining
    } else {
        Health::Unhealthy
    }
}

/// The (namespace, Service name) a slice belongs to, from its label.
pub fn slice_owner(slice: &EndpointSlice) -> Option<(String, String)> {
    let ns = slice.metadata.namespace.clone()?;
    let svc = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    Some((ns, svc))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn svc(json: serde_json::Value) -> KService {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn instances(objs: &[Object]) -> Vec<(String, String, u16, Health, Option<String>)> {
        objs.iter()
            .filter_map(|o| match o {
                Object::Instance {
                    id,
                    endpoint,
                    service,
                } => Some((
                    service.clone(),
                    id.clone(),
                    endpoint.port,
                    endpoint.health,
                    endpoint.zone.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    fn base_slice() -> EndpointSlice {
        slice(serde_json::json!({
            "metadata": {"name": "pay-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "pay"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "grpc-api", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "zone": "z1", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.0.0.4"]}
            ]
        }))
    }

    fn base_svc(annotations: serde_json::Value) -> KService {
        svc(serde_json::json!({
            "metadata": {"name": "pay", "namespace": "shop", "annotations": annotations},
            "spec": {"ports": [
                {"name": "http", "port": 80},
                {"name": "grpc-api", "port": 90, "appProtocol": "kubernetes.io/h2c"}
            ]}
        }))
    }

    #[test]
    fn first_port_health_and_zone() {
        let s = base_slice();
        let objs = service_objects(&base_svc(serde_json::json!({})), &[&s], None).unwrap();
        assert_eq!(
            objs[0],
            Object::Service {
                name: "pay.shop".into(),
                protocol: Protocol::Http
            }
        );
        assert_eq!(
            instances(&objs),
            vec![
                (
                    "pay.shop".into(),
                    "pay-abc/10.0.0.1:8080".into(),
                    8080,
                    Health::Healthy,
                    Some("z1".into())
                ),
                (
                    "pay.shop".into(),
                    "pay-abc/10.0.0.2:8080".into(),
                    8080,
                    Health::Draining,
                    None
                ),
                (
                    "pay.shop".into(),
                    "pay-abc/10.0.0.3:8080".into(),
                    8080,
                    Health::Unhealthy,
                    None
                ),
                (
                    "pay.shop".into(),
                    "pay-abc/10.0.0.4:8080".into(),
                    8080,
                    Health::Healthy,
                    None
                ),
            ]
        );
    }

    #[test]
    fn port_by_flag_annotation_and_grpc() {
        let s = base_slice();
        let objs =
            service_objects(&base_svc(serde_json::json!({})), &[&s], Some("grpc-api")).unwrap();
        assert!(matches!(
            objs[0],
            Object::Service {
                protocol: Protocol::Grpc,
                ..
            }
        ));
        assert_eq!(instances(&objs)[0].2, 9090);
        // The annotation wins over the flag; a number picks the Service port.
        let a = base_svc(serde_json::json!({"mesh.weft.dev/port": "80"}));
        let objs = service_objects(&a, &[&s], Some("grpc-api")).unwrap();
        assert_eq!(instances(&objs)[0].2, 8080);
        // A flag naming no port of this Service falls back to the first.
        let objs = service_objects(&base_svc(serde_json::json!({})), &[&s], Some("x")).unwrap();
        assert_eq!(instances(&objs)[0].2, 8080);
    }

    #[test]
    fn bad_annotation_names_the_field() {
        let a = base_svc(serde_json::json!({"mesh.weft.dev/port": "nope"}));
        let e = service_objects(&a, &[], None).unwrap_err();
        assert_eq!(e.field, "metadata.annotations[mesh.weft.dev/port]");
        assert!(e.reason.contains("nope"), "{e}");
    }

    #[test]
    fn fqdn_slices_and_external_names_give_no_instances() {
        let mut s = base_slice();
        s.address_type = "FQDN".into();
        let objs = service_objects(&base_svc(serde_json::json!({})), &[&s], None).unwrap();
        assert_eq!(objs.len(), 1);
        let ext = svc(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(service_objects(&ext, &[&s], None).unwrap().is_empty());
    }

    #[test]
    fn ipv6_addresses() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "pay-v6", "namespace": "shop"},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}]
        }));
        let objs = service_objects(&base_svc(serde_json::json!({})), &[&s], None).unwrap();
        assert_eq!(instances(&objs)[0].1, "pay-v6/fd00::1:8080");
    }
}
