//! Just enough IPv4/ICMPv4 to route, corrupt and reject packets.
//!
//! The emulator only ever needs the fixed part of the IPv4 header, the internet checksum and one kind of ICMP
//! error, so a packet-parsing crate would be more code to audit than this module.

use std::net::Ipv4Addr;

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER: usize = 20;
/// IP protocol number of ICMPv4.
pub const PROTO_ICMP: u8 = 1;
/// ICMP "destination unreachable".
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
/// Destination-unreachable code 13: "communication administratively prohibited" (RFC 1812).
pub const ICMP_CODE_ADMIN_PROHIBITED: u8 = 13;
/// TTL of packets the emulator originates (Linux's default).
pub const REPLY_TTL: u8 = 64;
/// How much of the offending datagram's payload an ICMP error quotes (RFC 792: the first 64 bits).
pub const QUOTED_PAYLOAD: usize = 8;

/// The fields of an IPv4 header the emulator uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// IHL·4, in bytes; always within the buffer.
    pub header_len: usize,
    /// The header's total-length field; always `header_len..=buffer length`.
    pub total_len: usize,
    /// Fragment offset in 8-byte units (flags masked off).
    pub fragment_offset: u16,
}

impl Ipv4Header {
    /// Byte range of the datagram's payload within the buffer.
    pub fn payload(&self) -> std::ops::Range<usize> {
        self.header_len..self.total_len
    }
}

/// Parses the IPv4 header at the start of `packet`.
///
/// Returns `None` for anything that is not a complete IPv4 header, or whose total length is shorter than its
/// header or longer than the buffer (a truncated read). Bytes after `total_len` are tolerated (padding). The
/// header checksum is not verified: packets come from a local kernel, which does not get it wrong, and the
/// receiving kernel checks it anyway.
pub fn parse_ipv4(packet: &[u8]) -> Option<Ipv4Header> {
    let fixed: &[u8; IPV4_MIN_HEADER] = packet.get(..IPV4_MIN_HEADER)?.try_into().ok()?;
    if fixed[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(fixed[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if header_len < IPV4_MIN_HEADER || total_len < header_len || total_len > packet.len() {
        return None;
    }
    Some(Ipv4Header {
        src: Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]),
        dst: Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]),
        protocol: fixed[9],
        header_len,
        total_len,
        fragment_offset: u16::from_be_bytes([fixed[6], fixed[7]]) & 0x1fff,
    })
}

/// The RFC 1071 internet checksum of `data` (an odd trailing byte is padded with zero).
///
/// Computing it over data that already contains a correct checksum field yields 0.
pub fn checksum(data: &[u8]) -> u16 {
    // A u64 accumulator cannot overflow for any buffer that fits in memory's worth of u16 words we will see
    // (2^48 words), so carries are folded once at the end instead of per word.
    let mut words = data.chunks_exact(2);
    let mut sum: u64 = words
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether an ICMP error may be sent about this datagram (RFC 1122 3.2.2).
///
/// No error is sent about an ICMP error (or an ICMP message too short to tell), so that two rejecting nodes
/// cannot bounce errors at each other forever, nor about a non-initial fragment, whose quoted bytes would not
/// identify a connection.
pub fn may_send_icmp_error(packet: &[u8], hdr: &Ipv4Header) -> bool {
    if hdr.fragment_offset != 0 {
        return false;
    }
    if hdr.protocol != PROTO_ICMP {
        return true;
    }
    // Only queries (echo, timestamp, ...) may be answered with an error; the error types are 3, 4, 5, 11 and
    // 12. Types 0..=2 and others unknown to RFC 792 are treated as errors too: being silent is the safe side.
    matches!(
        packet.get(hdr.header_len),
        Some(8 | 13 | 14 | 15 | 16 | 17 | 18)
    )
}

/// Builds the ICMP "destination unreachable: communication administratively prohibited" error a rejecting
/// filter sends back to the source of `packet`, as if from its destination.
///
/// The body quotes the original IP header and the first [`QUOTED_PAYLOAD`] bytes of its payload, which is
/// what the sender's kernel needs to find the socket (ports, TCP sequence number) and fail it with
/// `EHOSTUNREACH`.
pub fn admin_prohibited(packet: &[u8], hdr: &Ipv4Header) -> Vec<u8> {
    let quoted = &packet[..(hdr.header_len + QUOTED_PAYLOAD).min(hdr.total_len)];
    let icmp_len = 8 + quoted.len();
    let total = IPV4_MIN_HEADER + icmp_len;
    let mut out = Vec::with_capacity(total);
    // IPv4 header: version 4, IHL 5, no TOS, no fragmentation, ID 0 (allowed for atomic datagrams, RFC 6864).
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, REPLY_TTL, PROTO_ICMP, 0, 0]);
    out.extend_from_slice(&hdr.dst.octets());
    out.extend_from_slice(&hdr.src.octets());
    let ip_sum = checksum(&out[..IPV4_MIN_HEADER]);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // ICMP: type, code, checksum, 4 unused bytes, then the quote.
    out.extend_from_slice(&[
        ICMP_DEST_UNREACHABLE,
        ICMP_CODE_ADMIN_PROHIBITED,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    out.extend_from_slice(quoted);
    let icmp_sum = checksum(&out[IPV4_MIN_HEADER..]);
    out[IPV4_MIN_HEADER + 2..IPV4_MIN_HEADER + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_fields() {
        let p = udp([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
        let h = parse_ipv4(&p).unwrap();
        assert_eq!(h.src, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(h.dst, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(h.protocol, 17);
        assert_eq!(h.header_len, 20);
        assert_eq!(h.total_len, 33);
        assert_eq!(h.payload(), 20..33);
        assert_eq!(h.fragment_offset, 0);
    }

    #[test]
    fn rejects_malformed() {
        let p = udp([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
        assert!(parse_ipv4(&p[..19]).is_none(), "short header");
        assert!(parse_ipv4(&p[..30]).is_none(), "total length beyond buffer");
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert!(parse_ipv4(&v6).is_none(), "ipv6");
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert!(parse_ipv4(&ihl).is_none(), "ihl below 5");
        let mut long_ihl = p.clone();
        long_ihl[0] = 0x4f;
        assert!(
            parse_ipv4(&long_ihl).is_none(),
            "options beyond total length"
        );
        assert!(parse_ipv4(&[]).is_none());
    }

    #[test]
    fn checksum_known_vector() {
        // The classic example header from the Wikipedia article on the IPv4 header checksum.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        let mut with = h;
        with[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&with), 0);
        // Odd length: the last byte is the high half of a zero-padded word.
        assert_eq!(checksum(&[0x01]), !0x0100);
    }

    #[test]
    fn reply_is_valid_and_quotes() {
        let p = udp([10, 0, 0, 1], [10, 0, 0, 2], b"hello world");
        let h = parse_ipv4(&p).unwrap();
        let r = admin_prohibited(&p, &h);
        let rh = parse_ipv4(&r).unwrap();
        assert_eq!((rh.src, rh.dst, rh.protocol), (h.dst, h.src, PROTO_ICMP));
        assert_eq!(rh.total_len, r.len());
        assert_eq!(r[8], REPLY_TTL);
        assert_eq!(checksum(&r[..20]), 0);
        assert_eq!(checksum(&r[20..]), 0);
        assert_eq!((r[20], r[21]), (3, 13));
        assert_eq!(&r[28..], &p[..28]);
    }

    #[test]
    fn no_error_about_errors_or_fragments() {
        let p = udp([10, 0, 0, 1], [10, 0, 0, 2], b"x");
        let h = parse_ipv4(&p).unwrap();
        assert!(may_send_icmp_error(&p, &h));
        let r = admin_prohibited(&p, &h);
        assert!(!may_send_icmp_error(&r, &parse_ipv4(&r).unwrap()));
        let mut echo = r.clone();
        echo[20] = 8;
        assert!(may_send_icmp_error(&echo, &parse_ipv4(&echo).unwrap()));
        let mut frag = p.clone();
        frag[7] = 1;
        assert!(!may_send_icmp_error(&frag, &parse_ipv4(&frag).unwrap()));
    }
}
