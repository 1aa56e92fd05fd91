//! Service instances become EDS ClusterLoadAssignments.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality, SocketAddress, address,
    socket_address::{PortSpecifier, Protocol as SocketProtocol},
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use weft_registry::{Health, Instance, Registry, Service};

use crate::Flavor;
use crate::util::u32v;

/// One assignment per service (including services with no instances), sorted by name.
pub fn endpoints(reg: &Registry, flavor: Flavor) -> Vec<ClusterLoadAssignment> {
    reg.services
        .values()
        .map(|svc| endpoint_assignment(svc, flavor))
        .collect()
}

/// The assignment of one service: its instances grouped by zone.
///
/// Both flavours currently get the same message; the parameter keeps the call shape uniform
/// with the other builders so a per-client difference can be added without touching callers.
pub fn endpoint_assignment(svc: &Service, _flavor: Flavor) -> ClusterLoadAssignment {
    // BTreeMap: localities sorted by zone, "" (no zone) first.
    let mut by_zone: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for inst in &svc.instances {
        by_zone
            .entry(inst.endpoint.zone.as_deref().unwrap_or(""))
            .or_default()
            .push(inst);
    }
    let endpoints = by_zone
        .into_iter()
        .map(|(zone, mut insts)| {
            // The merged registry already sorts instances; a hand-built one may not.
            insts.sort_by(|a, b| {
                (&a.endpoint.address, a.endpoint.port).cmp(&(&b.endpoint.address, b.endpoint.port))
            });
            locality(zone, &insts)
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: svc.name.clone(),
        endpoints,
        ..Default::default()
    }
}

fn locality(zone: &str, insts: &[&Instance]) -> LocalityLbEndpoints {
    // gRPC drops localities without a weight, and splits traffic between localities by it, so
    // the weight is the capacity that can take traffic: the healthy endpoints' weights. At
    // least 1, so a locality whose endpoints are all down is still known (it receives nothing
    // because it has no ready endpoint).
    let healthy: u64 = insts
        .iter()
        .filter(|i| i.endpoint.health == Health::Healthy)
        .map(|i| u64::from(i.endpoint.weight))
        .sum();
    let weight = u32::try_from(healthy).unwrap_or(u32::MAX).max(1);
    LocalityLbEndpoints {
        // Always present: gRPC rejects a LocalityLbEndpoints without a Locality.
        locality: Some(Locality {
            zone: zone.to_string(),
            ..Default::default()
        }),
        lb_endpoints: insts.iter().map(|i| lb_endpoint(i)).collect(),
        load_balancing_weight: Some(u32v(weight)),
        ..Default::default()
    }
}

fn lb_endpoint(inst: &Instance) -> LbEndpoint {
    let ep = &inst.endpoint;
    let health = match ep.health {
        Health::Healthy => HealthStatus::Healthy,
        Health::Unhealthy => HealthStatus::Unhealthy,
        Health::Draining => HealthStatus::Draining,
    };
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    protocol: SocketProtocol::Tcp as i32,
                    address: ep.address.clone(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(ep.port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health as i32,
        load_balancing_weight: Some(u32v(ep.weight.max(1))),
        ..Default::default()
    }
}
