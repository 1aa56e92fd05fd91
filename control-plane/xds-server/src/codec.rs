//! Responses written from the cache's pre-encoded bytes.
//!
//! The generated `DiscoveryResponse` owns its resources as `Vec<u8>`, so sending one resource
//! to 10,000 streams would copy it 10,000 times before encoding. These two types implement
//! `prost::Message` over `Bytes` the cache encoded once; on the wire they are byte-for-byte the
//! `envoy.service.discovery.v3` messages, so any client decodes them with the generated types.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use crate::state::{DeltaOut, SotwOut, SotwResources};

/// `envoy.service.discovery.v3.DiscoveryResponse`, encode-only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SotwResponse {
    pub version_info: String,
    /// Encoded `google.protobuf.Any` values (field 2).
    pub resources: SotwResources,
    pub type_url: String,
    pub nonce: String,
}

impl Default for SotwResources {
    fn default() -> Self {
        SotwResources::Each(Vec::new())
    }
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

/// A response as the pieces of one gRPC message (its 5-byte header included), for the
/// response body.
pub(crate) trait Frames {
    fn frames(&self) -> Vec<Bytes>;
}

/// A resource at least this large goes out as the cache's own `Bytes`, uncopied.
const ZERO_COPY: usize = 4 * 1024;
/// Smaller fields are copied together into buffers of about this size.
const CHUNK: usize = 16 * 1024;

/// Writes a message's pieces into fresh buffers that are freed once h2 has written them.
/// tonic's encoder instead writes each message into one per-stream buffer that keeps the
/// capacity of the largest response for the stream's life: with 1,000 clusters that was a
/// few hundred kilobytes per idle stream.
struct Chunker {
    out: Vec<Bytes>,
    cur: Vec<u8>,
    left: usize,
}

impl Chunker {
    fn new(message_len: usize) -> Self {
        let mut c = Chunker {
            out: Vec::new(),
            cur: Vec::new(),
            left: message_len + 5,
        };
        c.reserve();
        c.cur.put_u8(0);
        c.cur
            .put_u32(u32::try_from(message_len).unwrap_or(u32::MAX));
        c
    }

    fn reserve(&mut self) {
        self.cur = Vec::with_capacity(self.left.min(CHUNK));
    }

    fn flush(&mut self) {
        if !self.cur.is_empty() {
            self.left = self.left.saturating_sub(self.cur.len());
            let full = std::mem::take(&mut self.cur);
            self.out.push(Bytes::from(full));
            self.reserve();
        }
    }

    fn string(&mut self, tag: u32, s: &str) {
        put_string(tag, s, &mut self.cur);
        if self.cur.len() >= CHUNK {
            self.flush();
        }
    }

    fn bytes(&mut self, tag: u32, b: &Bytes) {
        encoding::encode_key(tag, WireType::LengthDelimited, &mut self.cur);
        encoding::encode_varint(b.len() as u64, &mut self.cur);
        self.raw(b);
    }

    /// Bytes written as they are (already a field, or a field's value).
    fn raw(&mut self, b: &Bytes) {
        if b.len() >= ZERO_COPY {
            self.flush();
            self.left = self.left.saturating_sub(b.len());
            self.out.push(b.clone());
        } else {
            self.cur.extend_from_slice(b);
            if self.cur.len() >= CHUNK {
                self.flush();
            }
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.flush();
        self.out
    }
}

impl Frames for SotwResponse {
    fn frames(&self) -> Vec<Bytes> {
        let mut c = Chunker::new(prost::Message::encoded_len(self));
        c.string(1, &self.version_info);
        match &self.resources {
            SotwResources::Each(v) => v.iter().for_each(|r| c.bytes(2, r)),
            SotwResources::Shared { bytes, .. } => c.raw(bytes),
        }
        c.string(4, &self.type_url);
        c.string(5, &self.nonce);
        c.finish()
    }
}

impl Frames for DeltaResponse {
    fn frames(&self) -> Vec<Bytes> {
        let mut c = Chunker::new(prost::Message::encoded_len(self));
        c.string(1, &self.system_version_info);
        self.resources.iter().for_each(|r| c.bytes(2, r));
        c.string(4, &self.type_url);
        c.string(5, &self.nonce);
        for n in &self.removed_resources {
            put_bytes(6, n.as_bytes(), &mut c.cur);
        }
        c.finish()
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
        match &self.resources {
            SotwResources::Each(v) => {
                for r in v {
                    put_bytes(2, r, buf);
                }
            }
            SotwResources::Shared { bytes, .. } => buf.put_slice(bytes),
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
            + match &self.resources {
                SotwResources::Each(v) => v.iter().map(|r| len_bytes(2, r.len())).sum::<usize>(),
                SotwResources::Shared { bytes, .. } => bytes.len(),
            }
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
            resources: SotwResources::Each(vec![
                Bytes::from(any.encode_to_vec()),
                Bytes::from(any.encode_to_vec()),
            ]),
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

#[cfg(test)]
mod frame_tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    /// The frames of a message, concatenated, must be one gRPC message: a 5-byte header
    /// (uncompressed, length) and the protobuf encoding.
    fn unframe(frames: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = frames.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(all[0], 0);
        let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
        assert_eq!(all.len(), len + 5);
        all[5..].to_vec()
    }

    fn any(n: usize) -> Bytes {
        Bytes::from(
            Any {
                type_url: "t".into(),
                value: vec![7; n],
            }
            .encode_to_vec(),
        )
    }

    #[test]
    fn sotw_frames_are_the_message_and_share_large_resources() {
        let big = any(ZERO_COPY * 2);
        let each = SotwResponse {
            version_info: "v".into(),
            resources: SotwResources::Each(
                (0..200).map(|i| any(i * 7)).chain([big.clone()]).collect(),
            ),
            type_url: "t".into(),
            nonce: "3".into(),
        };
        let frames = each.frames();
        assert_eq!(unframe(&frames), each.encode_to_vec());
        // The large resource is the cache's allocation, not a copy.
        assert!(frames.iter().any(|f| f.as_ptr() == big.as_ptr()));
        assert!(frames.iter().all(|f| f.len() <= CHUNK + ZERO_COPY * 2 + 16));
        let got = DiscoveryResponse::decode(unframe(&frames).as_slice()).unwrap();
        assert_eq!(got.resources.len(), 201);

        let mut shared = Vec::new();
        for r in [any(3), any(ZERO_COPY)] {
            put_bytes(2, &r, &mut shared);
        }
        let shared = Bytes::from(shared);
        let whole = SotwResponse {
            version_info: "v".into(),
            resources: SotwResources::Shared {
                bytes: shared.clone(),
                count: 2,
            },
            type_url: "t".into(),
            nonce: "4".into(),
        };
        let frames = whole.frames();
        assert!(frames.iter().any(|f| f.as_ptr() == shared.as_ptr()));
        let got = DiscoveryResponse::decode(unframe(&frames).as_slice()).unwrap();
        assert_eq!(got.resources.len(), 2);
        assert_eq!(got.nonce, "4");
    }

    #[test]
    fn delta_frames_are_the_message() {
        let d = DeltaResponse {
            system_version_info: "s".into(),
            resources: [10, ZERO_COPY + 1]
                .map(|n| {
                    let r = envoy_types::pb::envoy::service::discovery::v3::Resource {
                        name: format!("r{n}"),
                        resource: Some(Any {
                            type_url: "t".into(),
                            value: vec![7; n],
                        }),
                        ..Default::default()
                    };
                    Bytes::from(r.encode_to_vec())
                })
                .to_vec(),
            type_url: "t".into(),
            nonce: "1".into(),
            removed_resources: vec!["gone".into()],
        };
        let got = DeltaDiscoveryResponse::decode(unframe(&d.frames()).as_slice()).unwrap();
        assert_eq!(got.resources.len(), 2);
        assert_eq!(got.removed_resources, vec!["gone"]);
        assert_eq!(
            d.frames().concat(),
            [
                &[0u8][..],
                &(d.encoded_len() as u32).to_be_bytes(),
                &d.encode_to_vec()
            ]
            .concat()
        );
    }
}
