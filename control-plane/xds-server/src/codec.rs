//! Responses written from the cache's pre-encoded bytes.
//!
//! The generated `DiscoveryResponse` owns its resources as `Vec<u8>`, so sending one resource
//! to 10,000 streams would copy it 10,000 times before encoding. These two types implement
//! `prost::Message` over `Bytes` the cache encoded once; on the wire they are byte-for-byte the
//! `envoy.service.discovery.v3` messages, so any client decodes them with the generated types.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use crate::state::{DeltaOut, SotwOut};

/// `envoy.service.discovery.v3.DiscoveryResponse`, encode-only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SotwResponse {
    pub version_info: String,
    /// Encoded `google.protobuf.Any` values (field 2).
    pub resources: Vec<Bytes>,
    pub type_url: String,
    pub nonce: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, encode-only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeltaResponse {
    pub system_version_info: String,
    /// Encoded `envoy.service.discovery.v3.Resource` values (field 2).
    pub resources: Vec<Bytes>,
    pub type_url: String,
    pub nonce: String,
    pub removed_resources: Vec<String>,
}

impl From<SotwOut> for SotwResponse {
    fn from(o: SotwOut) -> Self {
        Self {
            version_info: o.version_info,
            resources: o.resources,
            type_url: o.type_url,
            nonce: o.nonce,
        }
    }
}

impl From<DeltaOut> for DeltaResponse {
    fn from(o: DeltaOut) -> Self {
        Self {
            system_version_info: o.system_version_info,
            resources: o.resources,
            type_url: o.type_url,
            nonce: o.nonce,
            removed_resources: o.removed,
        }
    }
}

fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_bytes(tag, s.as_bytes(), buf);
    }
}

fn put_bytes(tag: u32, b: &[u8], buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

fn len_string(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_bytes(tag, s.len())
    }
}

fn len_bytes(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

/// These messages are only ever sent; a server never decodes them. Decoding skips fields
/// rather than failing so the trait stays total.
fn skip(
    tag: u32,
    wt: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), prost::DecodeError> {
    encoding::skip_field(wt, tag, buf, ctx)
}

impl prost::Message for SotwResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_string(1, &self.version_info, buf);
        for r in &self.resources {
            put_bytes(2, r, buf);
        }
        put_string(4, &self.type_url, buf);
        put_string(5, &self.nonce, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        skip(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        len_string(1, &self.version_info)
            + self
                .resources
                .iter()
                .map(|r| len_bytes(2, r.len()))
                .sum::<usize>()
            + len_string(4, &self.type_url)
            + len_string(5, &self.nonce)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl prost::Message for DeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_string(1, &self.system_version_info, buf);
        for r in &self.resources {
            put_bytes(2, r, buf);
        }
        put_string(4, &self.type_url, buf);
        put_string(5, &self.nonce, buf);
        for n in &self.removed_resources {
            put_bytes(6, n.as_bytes(), buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        skip(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        len_string(1, &self.system_version_info)
            + self
                .resources
                .iter()
                .map(|r| len_bytes(2, r.len()))
                .sum::<usize>()
            + len_string(4, &self.type_url)
            + len_string(5, &self.nonce)
            + self
                .removed_resources
                .iter()
                .map(|n| len_bytes(6, n.len()))
                .sum::<usize>()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    #[test]
    fn sotw_matches_the_generated_message() {
        let any = Any {
            type_url: "t".into(),
            value: vec![1, 2, 3],
        };
        let ours = SotwResponse {
            version_info: "v1".into(),
            resources: vec![
                Bytes::from(any.encode_to_vec()),
                Bytes::from(any.encode_to_vec()),
            ],
            type_url: "t".into(),
            nonce: "7".into(),
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        let theirs = DiscoveryResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(theirs.version_info, "v1");
        assert_eq!(theirs.resources, vec![any.clone(), any]);
        assert_eq!(theirs.nonce, "7");
        assert_eq!(theirs.type_url, "t");
    }

    #[test]
    fn delta_matches_the_generated_message() {
        let res = Resource {
            name: "a".into(),
            version: "v".into(),
            resource: Some(Any {
                type_url: "t".into(),
                value: vec![9],
            }),
            ..Default::default()
        };
        let ours = DeltaResponse {
            system_version_info: "s".into(),
            resources: vec![Bytes::from(res.encode_to_vec())],
            type_url: "t".into(),
            nonce: "1".into(),
            removed_resources: vec!["gone".into(), "x".into()],
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        let theirs = DeltaDiscoveryResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(theirs.resources, vec![res]);
        assert_eq!(theirs.removed_resources, vec!["gone", "x"]);
        assert_eq!(theirs.system_version_info, "s");
        assert_eq!(theirs.nonce, "1");
    }
}
