//! Simulated addresses: computed from a node's slot and generation, so the
//! slot of an address is worked out, not looked up.
//!
//! Node `slot` of generation `gen` is at `permute(gen << slot_bits | slot)`,
//! where `permute` is a keyed bijection of `u32`: addresses look drawn at
//! random (spread over /24s as random ones are, which the DHT's diversity
//! limit sees), and two nodes never share one. Sending a datagram needed a
//! map from address to node, a million entries at 10^6 nodes: two cache
//! misses a datagram, the largest single cost of the event loop there.
//!
//! A slot keeps `32 - slot_bits` bits of its generations (12 at 10^6
//! nodes): after 4096 departures from one slot its first address comes
//! back, as addresses are reused on real networks.

/// How addresses map to slots and generations, for one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddrPlan {
    slot_bits: u32,
    key: u32,
}

const M1: u32 = 0x9E37_79B1;
const M2: u32 = 0x85EB_CA6B;
const M3: u32 = 0xC2B2_AE35;

/// The inverse of odd `c` modulo 2^32 (Newton's iteration: each step
/// doubles the correct low bits, from 3 at the start).
const fn inverse(c: u32) -> u32 {
    let mut inv = c;
    let mut i = 0;
    while i < 5 {
        inv = inv.wrapping_mul(2u32.wrapping_sub(c.wrapping_mul(inv)));
        i += 1;
    }
    inv
}

const M1_INV: u32 = inverse(M1);
const M2_INV: u32 = inverse(M2);
const M3_INV: u32 = inverse(M3);

fn permute(mut x: u32, key: u32) -> u32 {
    x ^= key;
    x = x.wrapping_mul(M1);
    x ^= x >> 16;
    x = x.wrapping_mul(M2);
    x ^= x >> 13;
    x = x.wrapping_mul(M3);
    x ^ (x >> 16)
}

fn unpermute(mut x: u32, key: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(M3_INV);
    x ^= (x >> 13) ^ (x >> 26);
    x = x.wrapping_mul(M2_INV);
    x ^= x >> 16;
    x = x.wrapping_mul(M1_INV);
    x ^ key
}

impl AddrPlan {
    /// A plan for up to `slots` nodes at once (at most 2^31).
    pub fn new(slots: usize, key: u32) -> Self {
        assert!(slots <= 1 << 31, "at most 2^31 simulated nodes");
        let slot_bits = usize::BITS - slots.saturating_sub(1).leading_zeros();
        AddrPlan { slot_bits, key }
    }

    /// The address of node `slot` in generation `gen` (0 for the few
    /// pairs that map there: the caller skips that generation).
    pub fn addr(&self, slot: u32, gen: u32) -> u32 {
        let x = ((u64::from(gen) << self.slot_bits) as u32) | slot;
        permute(x, self.key)
    }

    /// The slot whose node is or was at `addr`.
    pub fn slot(&self, addr: u32) -> u32 {
        let mask = ((1u64 << self.slot_bits) - 1) as u32;
        unpermute(addr, self.key) & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_inverses_are_inverses() {
        for (m, inv) in [(M1, M1_INV), (M2, M2_INV), (M3, M3_INV)] {
            assert_eq!(m.wrapping_mul(inv), 1);
        }
    }

    #[test]
    fn a_million_slots_spread_over_distinct_slash_24s_as_random_addresses_do() {
        let plan = AddrPlan::new(1_000_000, 0x5EED);
        let mut nets: Vec<u32> = (0..1_000_000).map(|s| plan.addr(s, 0) >> 8).collect();
        nets.sort_unstable();
        nets.dedup();
        // 10^6 random addresses over 2^24 /24s fall into about
        // 2^24 * (1 - e^(-10^6 / 2^24)) = 970,900 distinct ones.
        assert!((960_000..980_000).contains(&nets.len()), "{}", nets.len());
    }

    proptest! {
        #[test]
        fn permute_is_a_bijection(x in any::<u32>(), key in any::<u32>()) {
            prop_assert_eq!(unpermute(permute(x, key), key), x);
        }

        #[test]
        fn an_address_gives_back_its_slot_and_differs_by_generation(
            slots in 1usize..5_000_000,
            slot in any::<u32>(),
            gen in 0u32..4000,
            key in any::<u32>(),
        ) {
            let plan = AddrPlan::new(slots, key);
            let slot = slot % slots as u32;
            let a = plan.addr(slot, gen);
            prop_assert_eq!(plan.slot(a), slot);
            // Generations differ in their kept bits (12 at 10^6 slots).
            if slots <= 1 << 20 {
                prop_assert_ne!(plan.addr(slot, gen + 1), a);
            }
        }
    }
}
