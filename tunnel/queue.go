package tunnel

// flowHash hashes the flow a packet belongs to (addresses, protocol and,
// for TCP and UDP, ports) for choosing the device queue it is written on.
// The kernel then reads the flow's outgoing packets from that same queue
// (a multi-queue TUN steers a flow to the queue its incoming packets were
// last written on), so each flow sticks to one tx loop and one queue is
// never the only busy one. Fragments hash without ports.
func flowHash(pkt []byte) uint32 {
	const (
		offset = 2166136261 // FNV-1a
		prime  = 16777619
	)
	h := uint32(offset)
	mix := func(b []byte) {
		for _, c := range b {
			h = (h ^ uint32(c)) * prime
		}
	}
	var proto byte
	var l4 []byte
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0x0f) * 4
		mix(pkt[12:20])
		proto = pkt[9]
		fragment := pkt[6]&0x3f != 0 || pkt[7] != 0 // MF or an offset
		if !fragment && ihl >= 20 && len(pkt) >= ihl+4 {
			l4 = pkt[ihl:]
		}
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		mix(pkt[8:40])
		proto = pkt[6] // extension headers: hashed without ports
		if len(pkt) >= 44 {
			l4 = pkt[40:]
		}
	default:
		return 0
	}
	h = (h ^ uint32(proto)) * prime
	if l4 != nil && (proto == 6 || proto == 17) { // TCP, UDP
		mix(l4[:4])
	}
	return h
}
