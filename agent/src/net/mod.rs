//! Network faults, applied inside the target's network namespace with the host's own tools
//! (the target needs none): firewall rules ([`firewall`]: partition, loss, DNS, and the
//! NFQUEUE delay fallback in [`delay`]) and traffic control ([`tc`]: netem, tbf, htb).
//!
//! Everything created is named after the fault's tag (see [`tag_for`]) so it can be found again:
//! by the undo recorded in the journal, and by the start-up sweep for leftovers.

pub mod delay;
pub mod firewall;
pub mod tc;

/// Prefix of every chain, table and qdisc handle name Faultline creates.
pub const TAG_PREFIX: &str = "flt";

/// A short, stable tag for a fault id, usable in iptables chain names (max 28 chars) and nft
/// table names: `flt` + 10 hex digits of an FNV-1a hash of the fault id.
pub fn tag_for(fault_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in fault_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{TAG_PREFIX}{:010x}", hash & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_stable_and_distinct() {
        let a = tag_for("run/stage/0");
        assert_eq!(a, tag_for("run/stage/0"));
        assert_ne!(a, tag_for("run/stage/1"));
        assert_eq!(a.len(), 13);
        assert!(a.starts_with(TAG_PREFIX));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
