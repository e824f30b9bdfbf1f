//! TUN offloads: super-packets and partial checksums, and how to turn them into wire packets.
//!
//! A TUN device opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (TSO, checksum offload) hands its reader
//! TCP/IPv4 *super-packets* of up to 64 KiB, each standing for several wire segments of `gso_size` payload
//! bytes, and packets whose transport checksum is left for the "hardware" to complete. Every read and write
//! then starts with a `virtio_net_hdr` ([`VnetHeader`]) that says so. Passing a super-packet on intact costs
//! one read and one write for up to 44 wire packets; where an impairment must act per wire packet, the
//! emulator splits it here into exactly the segments the kernel's own software segmentation (or a NIC's TSO)
//! would have put on a wire, with complete checksums.
//!
//! Pure: byte slices in, byte vectors out. IPv4 only, like the rest of the emulator.

use crate::packet;

/// Length of the `virtio_net_hdr` that precedes every packet on a TUN opened with `IFF_VNET_HDR`
/// (the default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the pseudo-header
/// sum; the rest is to be computed over `packet[csum_start..]`.
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
/// Set together with a GSO type when the super-packet carries ECN's CWR, which only its first segment keeps.
const GSO_ECN: u8 = 0x80;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_MIN_HEADER: usize = 20;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// What the kernel left undone in a packet read from a TUN with offloads, and may leave undone in one
/// written to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// A TCP/IPv4 super-packet, to be cut into segments of this many payload bytes.
    pub gso: Option<Gso>,
    /// The transport checksum is partial (see [`PartialCsum`]).
    pub csum: Option<PartialCsum>,
}

impl Offload {
    /// A complete wire packet: nothing left to do.
    pub const NONE: Offload = Offload {
        gso: None,
        csum: None,
    };

    pub fn is_none(&self) -> bool {
        *self == Offload::NONE
    }
}

/// TCP segmentation of a super-packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Payload bytes per segment (the MSS), at least 1.
    pub size: u16,
    /// The kernel marked it `VIRTIO_NET_HDR_GSO_ECN` (CWR set: only the first segment keeps it).
    pub ecn: bool,
}

/// A checksum that holds only the pseudo-header's sum (`CHECKSUM_PARTIAL`): complete it by summing
/// `packet[start..]` and storing the complement at `start + offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialCsum {
    pub start: u16,
    pub offset: u16,
}

/// Why a packet with offloads cannot be turned into wire packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("the virtio-net header is truncated")]
    ShortHeader,
    #[error("an offload this emulator does not support (GSO type {0:#x})")]
    Unsupported(u8),
    #[error("a super-packet that is not a well-formed TCP/IPv4 packet")]
    NotTcp4,
    #[error("a partial checksum outside the packet")]
    BadChecksumOffset,
}

/// The `virtio_net_hdr` as the TUN driver lays it out (native byte order, which is what a TUN without
/// `TUNSETVNETBE`/`TUNSETVNETLE` uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    pub fn parse(b: &[u8]) -> Result<VnetHeader, OffloadError> {
        let b: &[u8; VNET_HDR_LEN] = b
            .get(..VNET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(OffloadError::ShortHeader)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// What the header says was left undone. Only TCP/IPv4 segmentation is supported: it is the only one
    /// the sidecar enables (`TUN_F_TSO4`), so anything else is a kernel this code does not know.
    pub fn offload(&self) -> Result<Offload, OffloadError> {
        let csum = (self.flags & F_NEEDS_CSUM != 0).then_some(PartialCsum {
            start: self.csum_start,
            offset: self.csum_offset,
        });
        let gso = match self.gso_type & !GSO_ECN {
            GSO_NONE => None,
            GSO_TCPV4 if self.gso_size > 0 => Some(Gso {
                size: self.gso_size,
                ecn: self.gso_type & GSO_ECN != 0,
            }),
            _ => return Err(OffloadError::Unsupported(self.gso_type)),
        };
        Ok(Offload { gso, csum })
    }

    /// The header to write in front of `packet` so that the receiving kernel finishes what `off` says is
    /// undone (it then takes a partial checksum as verified, as from a NIC that will compute it).
    pub fn for_packet(packet: &[u8], off: Offload) -> VnetHeader {
        let mut h = VnetHeader::default();
        if let Some(c) = off.csum {
            h.flags = F_NEEDS_CSUM;
            h.csum_start = c.start;
            h.csum_offset = c.offset;
        }
        if let Some(g) = off.gso {
            h.gso_type = GSO_TCPV4 | if g.ecn { GSO_ECN } else { 0 };
            h.gso_size = g.size;
            // IP and TCP headers: a hint for the receiving kernel, which checks it against the packet.
            h.hdr_len = tcp4_headers(packet).map_or(0, |(ip, tcp)| (ip + tcp) as u16);
        }
        h
    }
}

/// The IPv4 and TCP header lengths of an unfragmented TCP/IPv4 packet.
fn tcp4_headers(packet: &[u8]) -> Option<(usize, usize)> {
    let hdr = packet::parse_ipv4(packet)?;
    let more_fragments = packet[6] & 0x20 != 0;
    if hdr.protocol != PROTO_TCP || hdr.fragment_offset != 0 || more_fragments {
        return None;
    }
    let ip = hdr.header_len;
    let tcp = usize::from(*packet.get(ip + 12)? >> 4) * 4;
    (tcp >= TCP_MIN_HEADER && ip + tcp <= hdr.total_len).then_some((ip, tcp))
}

/// How many wire packets `packet` stands for under `off`: its segments for a super-packet, else 1.
pub fn wire_count(packet: &[u8], off: Offload) -> Result<usize, OffloadError> {
    let Some(gso) = off.gso else {
        return Ok(1);
    };
    let (ip, tcp) = tcp4_headers(packet).ok_or(OffloadError::NotTcp4)?;
    let total = packet::parse_ipv4(packet).map_or(0, |h| h.total_len);
    let payload = total - ip - tcp;
    Ok(payload.div_ceil(usize::from(gso.size)).max(1))
}

/// The wire packets `packet` stands for under `off`, each complete (checksums included), appended to
/// `out`: the segments of a super-packet, the packet with its checksum completed, or the packet itself.
pub fn wire_packets(
    packet: Vec<u8>,
    off: Offload,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), OffloadError> {
    match (off.gso, off.csum) {
        (Some(gso), _) => segment_tcp4(&packet, usize::from(gso.size), out),
        (None, Some(c)) => {
            let mut p = packet;
            complete_checksum(&mut p, c)?;
            out.push(p);
            Ok(())
        }
        (None, None) => {
            out.push(packet);
            Ok(())
        }
    }
}

/// Completes a partial transport checksum in place, as a NIC (or the kernel's `skb_checksum_help`) does:
/// the field already holds the pseudo-header's sum, so the checksum of `packet[start..]` is the final value.
pub fn complete_checksum(packet: &mut [u8], c: PartialCsum) -> Result<(), OffloadError> {
    let start = usize::from(c.start);
    let at = start + usize::from(c.offset);
    // Up to the IP total length: bytes after it are not the datagram's (and TUN reads have none).
    let end = packet::parse_ipv4(packet).map_or(packet.len(), |h| h.total_len);
    if at + 2 > end {
        return Err(OffloadError::BadChecksumOffset);
    }
    let mut sum = packet::checksum(&packet[start..end]);
    // A UDP checksum of 0 means "none" (RFC 768): a computed 0 is sent as its other form.
    let is_udp = packet.get(9) == Some(&PROTO_UDP) && c.offset == 6;
    if sum == 0 && is_udp {
        sum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The 16-bit one's-complement sum (not complemented, not folded) of `data`, continuing from `sum`.
fn add_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in words.by_ref() {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Cuts a TCP/IPv4 super-packet into segments of at most `mss` payload bytes, appended to `out`, as the
/// kernel's TCP segmentation does (`tcp_gso_segment`, `inet_gso_segment`): each segment has the original
/// IP header (options included) with its own total length, an IP id that counts up from the original's,
/// and a fresh header checksum; the TCP header with the sequence number advanced by the payload before it,
/// FIN and PSH only on the last segment and CWR only on the first; and a complete TCP checksum, whatever
/// the original's checksum field held (a partial checksum, typically).
pub fn segment_tcp4(packet: &[u8], mss: usize, out: &mut Vec<Vec<u8>>) -> Result<(), OffloadError> {
    let (ip, tcp) = tcp4_headers(packet).ok_or(OffloadError::NotTcp4)?;
    if mss == 0 {
        return Err(OffloadError::NotTcp4);
    }
    let total = packet::parse_ipv4(packet).map_or(0, |h| h.total_len);
    let headers = &packet[..ip + tcp];
    let payload = &packet[ip + tcp..total];
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let seq = u32::from_be_bytes([
        packet[ip + 4],
        packet[ip + 5],
        packet[ip + 6],
        packet[ip + 7],
    ]);
    // The pseudo-header's addresses and protocol are the same for every segment.
    let pseudo = add_words(u64::from(PROTO_TCP), &packet[12..20]);
    let count = payload.len().div_ceil(mss).max(1);
    out.reserve(count);
    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let len = headers.len() + chunk.len();
        let mut p = Vec::with_capacity(len);
        p.extend_from_slice(headers);
        p.extend_from_slice(chunk);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        p[10..12].fill(0);
        let ip_sum = packet::checksum(&p[..ip]);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let t = &mut p[ip..];
        t[4..8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        if i + 1 < count {
            t[13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            t[13] &= !TCP_CWR;
        }
        t[16..18].fill(0);
        let sum = !fold(add_words(pseudo + (t.len() as u64), t));
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        out.push(p);
    }
    Ok(())
}

/// The bytes a super-packet's segments take on the wire (headers repeated per segment).
pub fn wire_bytes(packet: &[u8], off: Offload) -> usize {
    match (off.gso, tcp4_headers(packet)) {
        (Some(g), Some((ip, tcp))) => {
            let total = packet::parse_ipv4(packet).map_or(0, |h| h.total_len);
            let payload = total - ip - tcp;
            let n = payload.div_ceil(usize::from(g.size)).max(1);
            payload + n * (ip + tcp)
        }
        _ => packet.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 packet 10.0.0.1:1000 -> 10.0.0.2:2000 with `flags`, `options` bytes of IP options and a
    /// payload of `len` bytes counting up; its TCP checksum field holds `check`.
    fn tcp(len: usize, flags: u8, ip_options: usize, check: u16) -> Vec<u8> {
        let ip = 20 + ip_options;
        let total = ip + 20 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x40 | (ip / 4) as u8;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        for b in &mut p[20..ip] {
            *b = 1; // NOP options
        }
        let ip_sum = packet::checksum(&p[..ip]);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let t = &mut p[ip..];
        t[0..2].copy_from_slice(&1000u16.to_be_bytes());
        t[2..4].copy_from_slice(&2000u16.to_be_bytes());
        t[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&500u16.to_be_bytes());
        t[16..18].copy_from_slice(&check.to_be_bytes());
        for (i, b) in t[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// Verifies a segment's checksums independently: the RFC 1071 checksum of the IP header, and of a
    /// separately built pseudo-header followed by the TCP segment, must both be 0.
    fn checksums_ok(p: &[u8]) -> bool {
        let ip = usize::from(p[0] & 0x0f) * 4;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&((p.len() - ip) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[ip..]);
        packet::checksum(&p[..ip]) == 0 && packet::checksum(&pseudo) == 0
    }

    fn seq(p: &[u8]) -> u32 {
        let ip = usize::from(p[0] & 0x0f) * 4;
        u32::from_be_bytes(p[ip + 4..ip + 8].try_into().unwrap())
    }

    #[test]
    fn segments_have_lengths_seqs_ids_flags_and_checksums() {
        const FLAGS: u8 = TCP_FIN | TCP_PSH | TCP_CWR | 0x10; // FIN PSH CWR ACK
        for ip_options in [0, 8] {
            let p = tcp(3000, FLAGS, ip_options, 0x1234);
            let mut out = Vec::new();
            segment_tcp4(&p, 1448, &mut out).unwrap();
            let ip = 20 + ip_options;
            let lens: Vec<usize> = out.iter().map(|s| s.len() - ip - 20).collect();
            assert_eq!(lens, [1448, 1448, 104]);
            // Sequence numbers advance by the payload before them (wrapping at 2^32).
            let seqs: Vec<u32> = out.iter().map(|s| seq(s)).collect();
            assert_eq!(
                seqs,
                [
                    0xffff_fff0,
                    0xffff_fff0u32.wrapping_add(1448),
                    1448 * 2 - 16
                ]
            );
            let flags: Vec<u8> = out.iter().map(|s| s[ip + 13]).collect();
            assert_eq!(flags, [TCP_CWR | 0x10, 0x10, TCP_FIN | TCP_PSH | 0x10]);
            let ids: Vec<u16> = out
                .iter()
                .map(|s| u16::from_be_bytes([s[4], s[5]]))
                .collect();
            assert_eq!(ids, [0xfffe, 0xffff, 0]);
            let mut payload = Vec::new();
            for s in &out {
                assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                assert_eq!(&s[..2], &p[..2]);
                assert_eq!(&s[6..10], &p[6..10], "flags, fragment, ttl, protocol");
                assert_eq!(&s[12..ip], &p[12..ip], "addresses and options");
                assert_eq!(&s[ip..ip + 4], &p[ip..ip + 4], "ports");
                assert_eq!(&s[ip + 8..ip + 13], &p[ip + 8..ip + 13], "ack, offset");
                assert!(checksums_ok(s));
                payload.extend_from_slice(&s[ip + 20..]);
            }
            assert_eq!(payload, &p[ip + 20..]);
            assert_eq!(
                wire_count(&p, off(1448)),
                Ok(3),
                "counted as it is segmented"
            );
            assert_eq!(wire_bytes(&p, off(1448)), 3000 + 3 * (ip + 20));
        }
    }

    fn off(size: u16) -> Offload {
        Offload {
            gso: Some(Gso { size, ecn: false }),
            csum: Some(PartialCsum {
                start: 20,
                offset: 16,
            }),
        }
    }

    #[test]
    fn a_small_or_empty_super_packet_is_one_segment() {
        for len in [0, 1, 1448] {
            let p = tcp(len, TCP_FIN | 0x10, 0, 0);
            let mut out = Vec::new();
            segment_tcp4(&p, 1448, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].len(), p.len());
            assert_eq!(out[0][33], TCP_FIN | 0x10);
            assert!(checksums_ok(&out[0]));
        }
    }

    #[test]
    fn segmenting_refuses_what_is_not_tcp4() {
        let mut udp = tcp(100, 0, 0, 0);
        udp[9] = PROTO_UDP;
        let mut out = Vec::new();
        assert_eq!(segment_tcp4(&udp, 50, &mut out), Err(OffloadError::NotTcp4));
        let mut fragment = tcp(100, 0, 0, 0);
        fragment[6] |= 0x20;
        assert_eq!(
            segment_tcp4(&fragment, 50, &mut out),
            Err(OffloadError::NotTcp4)
        );
        // A 60-byte TCP header in a packet with 30 bytes after the IP header.
        let mut bad_offset = tcp(10, 0, 0, 0);
        bad_offset[32] = 15 << 4;
        assert_eq!(
            segment_tcp4(&bad_offset, 50, &mut out),
            Err(OffloadError::NotTcp4)
        );
        assert_eq!(
            segment_tcp4(&tcp(10, 0, 0, 0), 0, &mut out),
            Err(OffloadError::NotTcp4)
        );
        assert!(out.is_empty());
    }

    /// The partial checksum the kernel leaves: the folded pseudo-header sum, not complemented.
    fn pseudo_sum(p: &[u8]) -> u16 {
        let ip = usize::from(p[0] & 0x0f) * 4;
        let mut v = Vec::new();
        v.extend_from_slice(&p[12..20]);
        v.extend_from_slice(&[0, p[9]]);
        v.extend_from_slice(&((p.len() - ip) as u16).to_be_bytes());
        !packet::checksum(&v)
    }

    #[test]
    fn completing_a_partial_checksum_gives_the_full_one() {
        let mut p = tcp(333, 0x18, 0, 0);
        let partial = pseudo_sum(&p);
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(
            &mut p,
            PartialCsum {
                start: 20,
                offset: 16,
            },
        )
        .unwrap();
        assert!(checksums_ok(&p));
        assert_eq!(
            complete_checksum(
                &mut p,
                PartialCsum {
                    start: 20,
                    offset: 400
                }
            ),
            Err(OffloadError::BadChecksumOffset)
        );
    }

    #[test]
    fn vnet_headers_round_trip_and_say_what_is_undone() {
        let p = tcp(3000, 0x10, 0, 0);
        let o = off(1448);
        let h = VnetHeader::for_packet(&p, o);
        assert_eq!(h.hdr_len, 40);
        let back = VnetHeader::parse(&h.to_bytes()).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.offload(), Ok(o));
        assert_eq!(
            VnetHeader::parse(&[0; VNET_HDR_LEN]).unwrap().offload(),
            Ok(Offload::NONE)
        );
        let ecn = VnetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            gso_size: 1000,
            ..VnetHeader::default()
        };
        assert_eq!(
            ecn.offload().unwrap().gso,
            Some(Gso {
                size: 1000,
                ecn: true
            })
        );
        // UDP (3) and TCP/IPv6 (4) segmentation are never enabled, so never expected.
        for t in [3, 4] {
            let h = VnetHeader {
                gso_type: t,
                gso_size: 1000,
                ..VnetHeader::default()
            };
            assert_eq!(h.offload(), Err(OffloadError::Unsupported(t)));
        }
        assert_eq!(VnetHeader::parse(&[0; 9]), Err(OffloadError::ShortHeader));
    }

    #[test]
    fn wire_packets_of_each_kind() {
        let mut out = Vec::new();
        let p = tcp(100, 0x10, 0, 0);
        wire_packets(p.clone(), Offload::NONE, &mut out).unwrap();
        assert_eq!(out, std::slice::from_ref(&p));
        out.clear();
        let mut partial = p.clone();
        partial[36..38].copy_from_slice(&pseudo_sum(&p).to_be_bytes());
        let csum_only = Offload {
            gso: None,
            ..off(1)
        };
        wire_packets(partial, csum_only, &mut out).unwrap();
        assert!(checksums_ok(&out[0]));
        out.clear();
        wire_packets(p, off(30), &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|s| checksums_ok(s)));
    }
}
