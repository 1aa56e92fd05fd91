//! LDS Listeners: one shared HTTP listener for Envoy, one api_listener per service for gRPC.

use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, address,
    socket_address::{PortSpecifier, Protocol as SocketProtocol},
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter::ConfigType,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter::ConfigType as HttpFilterConfigType,
};
use weft_registry::Registry;

use crate::rate_limit::{LOCAL_RATE_LIMIT_FILTER, listener_filter};
use crate::util::{ads, pack};
use crate::{Flavor, HTTP_LISTENER_NAME, Options};

const HCM_FILTER_NAME: &str = "envoy.filters.network.http_connection_manager";
const ROUTER_FILTER_NAME: &str = "envoy.filters.http.router";

/// Envoy: exactly one listener, [`HTTP_LISTENER_NAME`], even with no services (so Envoy always
/// has something bound). gRPC: one `api_listener` per service, named after it, which is what an
/// `xds:///<service>` target asks for. Reads service names only.
pub fn listeners(reg: &Registry, opts: &Options, flavor: Flavor) -> Vec<Listener> {
    match flavor {
        Flavor::Envoy => vec![http_listener(opts)],
        Flavor::Grpc => reg.services.keys().map(|name| api_listener(name)).collect(),
    }
}

fn http_listener(opts: &Options) -> Listener {
    let hcm = hcm(HTTP_LISTENER_NAME, HTTP_LISTENER_NAME, Flavor::Envoy);
    Listener {
        name: HTTP_LISTENER_NAME.to_string(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                protocol: SocketProtocol::Tcp as i32,
                address: opts.http_listener_address.clone(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(opts.http_listener_port))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER_NAME.to_string(),
                config_type: Some(ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// No address: a gRPC client listener is a name, not a socket.
fn api_listener(service: &str) -> Listener {
    let hcm = hcm(service, service, Flavor::Grpc);
    Listener {
        name: service.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(&hcm)),
        }),
        ..Default::default()
    }
}

/// Envoy's HCM also carries the local rate limit filter, inactive until a virtual host or route
/// enables it ([`crate::rate_limit`]); gRPC's gets the router alone, as gRPC clients reject
/// HTTP filters they do not implement.
fn hcm(stat_prefix: &str, route_config_name: &str, flavor: Flavor) -> HttpConnectionManager {
    let mut http_filters = Vec::with_capacity(2);
    if flavor == Flavor::Envoy {
        http_filters.push(HttpFilter {
            name: LOCAL_RATE_LIMIT_FILTER.to_string(),
            config_type: Some(HttpFilterConfigType::TypedConfig(pack(&listener_filter()))),
            ..Default::default()
        });
    }
    // The router must be last (both Envoy and gRPC check the terminal filter).
    http_filters.push(HttpFilter {
        name: ROUTER_FILTER_NAME.to_string(),
        config_type: Some(HttpFilterConfigType::TypedConfig(pack(&Router::default()))),
        ..Default::default()
    });
    HttpConnectionManager {
        // AUTO sniffs HTTP/1.1 vs h2c per connection, so gRPC and plain HTTP share a port.
        codec_type: CodecType::Auto as i32,
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters,
        ..Default::default()
    }
}
