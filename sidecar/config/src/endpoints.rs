//! ClusterLoadAssignment -> endpoint list.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use weft_balance::{EndpointHealth, EndpointSpec};

use crate::ConfigError;
use crate::util::err;

pub(crate) fn read(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointSpec>, ConfigError> {
    let res = format!("endpoints {}", cla.cluster_name);
    let res = res.as_str();
    let mut out = Vec::new();
    for (li, loc) in cla.endpoints.iter().enumerate() {
        let zone = loc
            .locality
            .as_ref()
            .map(|l| l.zone.as_str())
            .filter(|z| !z.is_empty())
            .map(str::to_string);
        for (ei, lb) in loc.lb_endpoints.iter().enumerate() {
            let field = format!("endpoints[{li}].lb_endpoints[{ei}]");
            let ep = match &lb.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep,
                Some(HostIdentifier::EndpointName(n)) => {
                    return Err(err(
                        res,
                        format!("{field} names endpoint `{n}`; named endpoints are not supported"),
                    ));
                }
                None => return Err(err(res, format!("{field} has no endpoint"))),
            };
            let sa = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(AddressKind::SocketAddress(sa)) => sa,
                Some(_) => {
                    return Err(err(res, format!("{field} is not a socket address")));
                }
                None => return Err(err(res, format!("{field} has no address"))),
            };
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                err(
                    res,
                    format!("{field} address {:?} is not an IP address", sa.address),
                )
            })?;
            let port = match &sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err(res, format!("{field} port {p} is not in 1..=65535")))?,
                Some(PortSpecifier::NamedPort(n)) => {
                    return Err(err(res, format!("{field} has named port `{n}`")));
                }
                None => return Err(err(res, format!("{field} has no port"))),
            };
            let weight = lb.load_balancing_weight.map_or(1, |w| w.value);
            if weight == 0 {
                return Err(err(res, format!("{field} load_balancing_weight is 0")));
            }
            out.push(EndpointSpec {
                addr: SocketAddr::new(ip, port),
                weight,
                zone: zone.clone(),
                health: health(lb.health_status),
            });
        }
    }
    Ok(out)
}

fn health(status: i32) -> EndpointHealth {
    match HealthStatus::try_from(status) {
        // UNKNOWN is what a control plane without health information sends: Envoy routes to it.
        Ok(HealthStatus::Healthy | HealthStatus::Unknown) => EndpointHealth::Healthy,
        Ok(HealthStatus::Draining) => EndpointHealth::Draining,
        _ => EndpointHealth::Unhealthy,
    }
}
