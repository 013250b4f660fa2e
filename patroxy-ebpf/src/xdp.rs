//! `patroxy_xdp` and `patroxy_tc`: the allowlist in front of patroxy's ports (`allowlist`),
//! run on each packet as it arrives on an interface, before any socket sees it.
//!
//! The XDP program runs in the driver, before the kernel builds a socket buffer: the cheapest
//! place on a physical NIC. On a veth, though, every XDP mode copies each TCP packet first
//! (TCP transmits clones, which XDP may not write to), so there the tc program judges the
//! socket buffer as it is, at tc ingress (tcx, Linux 6.6). Both call the same decision on
//! the same maps; userspace picks which one an interface gets.
#![no_std]
#![no_main]

mod allowlist;
mod token_bucket;

use allowlist::{Packet, Verdict};
use aya_ebpf::{
    bindings::{
        TC_ACT_SHOT, TC_ACT_UNSPEC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::bpf_xdp_load_bytes,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// `frags`: the program handles multi-buffer packets (BPF_F_XDP_HAS_FRAGS), so a driver lets
/// it attach where the MTU exceeds a page (a single-buffer program is refused there). veth
/// turns its peer's segmentation offloads off either way (the README's Measured section). Only
/// the first buffer is in `data..data_end`; `read` falls back to `bpf_xdp_load_bytes` for
/// headers that continue past it.
#[xdp(frags)]
pub fn patroxy_xdp(ctx: XdpContext) -> u32 {
    xdp_action(allowlist::judge(&Xdp::<true>(&ctx)))
}

/// The same allowlist for kernels before 5.18, which know neither BPF_F_XDP_HAS_FRAGS nor
/// `bpf_xdp_load_bytes`: userspace loads it when `patroxy_xdp` is refused.
#[xdp]
pub fn patroxy_xdp_single_buffer(ctx: XdpContext) -> u32 {
    xdp_action(allowlist::judge(&Xdp::<false>(&ctx)))
}

/// The allowlist at tc ingress, attached through tcx. A packet it lets through goes on with
/// TC_ACT_UNSPEC (tcx's TCX_NEXT): the next program on the interface, then classic tc, then
/// the stack. TC_ACT_OK would end the chain there, skipping the programs other owners
/// attached after this one; only a drop is this program's decision to make.
#[classifier]
pub fn patroxy_tc(ctx: TcContext) -> i32 {
    match allowlist::judge(&Tc(&ctx)) {
        Some(Verdict::Drop) => TC_ACT_SHOT as i32,
        Some(Verdict::Pass) | None => TC_ACT_UNSPEC,
    }
}

fn xdp_action(verdict: Option<Verdict>) -> u32 {
    match verdict {
        Some(Verdict::Drop) => XDP_DROP,
        Some(Verdict::Pass) | None => XDP_PASS,
    }
}

/// An XDP packet; `FRAGS`: it may continue past its first buffer.
struct Xdp<'a, const FRAGS: bool>(&'a XdpContext);

impl<const FRAGS: bool> Packet for Xdp<'_, FRAGS> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let ctx = self.0;
        if let Some(value) = direct(ctx.data(), ctx.data_end(), offset) {
            return Some(value);
        }
        if !FRAGS {
            return None;
        }
        // Past the first buffer of a multi-buffer packet (or past the end of the packet, which
        // the helper reports as an error).
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        let copied = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                offset as u32,
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        (copied == 0).then(|| unsafe { value.assume_init() })
    }
}

/// A socket buffer at tc ingress, its data starting at the Ethernet header (tcx pushes it back
/// for ingress programs). A VLAN tag is usually in the skb's metadata by then, not in the data.
struct Tc<'a>(&'a TcContext);

impl Packet for Tc<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let ctx = self.0;
        // Headers past the linear part (paged data) are copied out by bpf_skb_load_bytes.
        direct(ctx.data(), ctx.data_end(), offset).or_else(|| ctx.load::<T>(offset).ok())
    }
}

/// A `T` at `offset` in `start..end`, read in place, if it is all there.
#[inline(always)]
fn direct<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    if start + offset + core::mem::size_of::<T>() <= end {
        return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    None
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
