package tunnel

import "bytes"

// SmallPacket is the largest plain packet the tx loop sends ahead of the
// super-packets read in the same batch: pings, TCP ACKs, request/response
// messages, DNS.
const SmallPacket = 256

// prioritize moves the small plain packets of a batch ahead of the rest,
// keeping the order within each group, unless an earlier frame of the
// batch belongs to the same flow (so no flow is ever reordered). A bulk
// TCP stream keeps about a millisecond of super-packets in the TUN's queue
// (TCP small queues); without this a ping read in the same batch waits for
// all of them to be sent. It reports how many frames moved ahead.
func prioritize(fs []Frame) int {
	n := 0
	for i := range fs {
		if !small(&fs[i]) {
			continue
		}
		if i == n {
			n++
			continue
		}
		p := fs[i].Packet()
		shared := false
		for j := n; j < i; j++ {
			if sameFlowKey(fs[j].Packet(), p) {
				shared = true
				break
			}
		}
		if shared {
			continue
		}
		f := fs[i]
		copy(fs[n+1:i+1], fs[n:i])
		fs[n] = f
		n++
	}
	return n
}

func small(f *Frame) bool {
	return f.Offload.GSOType == GSONone && len(f.Packet()) <= SmallPacket
}

// sameFlowKey reports whether two IP packets share addresses, protocol and
// (for TCP and UDP) ports. Anything it cannot parse counts as the same
// flow, so it stays where it is.
func sameFlowKey(p, q []byte) bool {
	vp, ipp, okp := ipHeaderLen(p)
	vq, ipq, okq := ipHeaderLen(q)
	if !okp || !okq {
		return true
	}
	if vp != vq {
		return false
	}
	po := protoOffset(vp)
	if p[po] != q[po] {
		return false
	}
	if vp == 4 {
		if !bytes.Equal(p[12:20], q[12:20]) {
			return false
		}
	} else if !bytes.Equal(p[8:40], q[8:40]) {
		return false
	}
	if p[po] != 6 && p[po] != 17 {
		return true
	}
	if len(p) < ipp+4 || len(q) < ipq+4 {
		return true
	}
	return bytes.Equal(p[ipp:ipp+4], q[ipq:ipq+4])
}
