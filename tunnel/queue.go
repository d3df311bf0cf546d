package tunnel

// flowHash hashes the flow a packet belongs to (addresses, protocol and,
// for TCP and UDP, ports), the same in both directions, for choosing the
// device queue it is written on and for the flow table. The kernel then
// reads the flow's outgoing packets from that same queue (a multi-queue
// TUN steers a flow to the queue its incoming packets were last written
// on), so each flow sticks to one tx loop and one queue is never the only
// busy one. Fragments hash without ports.
func flowHash(pkt []byte) uint32 {
	var src, dst, l4 []byte
	var proto byte
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0x0f) * 4
		src, dst, proto = pkt[12:16], pkt[16:20], pkt[9]
		fragment := pkt[6]&0x3f != 0 || pkt[7] != 0 // MF or an offset
		if !fragment && ihl >= 20 && len(pkt) >= ihl+4 {
			l4 = pkt[ihl:]
		}
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		src, dst, proto = pkt[8:24], pkt[24:40], pkt[6] // extension headers: hashed without ports
		if len(pkt) >= 44 {
			l4 = pkt[40:]
		}
	default:
		return 0
	}
	var sport, dport []byte
	if l4 != nil && (proto == 6 || proto == 17) { // TCP, UDP
		sport, dport = l4[:2], l4[2:4]
	}
	// Each end hashed on its own, then combined symmetrically.
	h := fnv(src, sport) ^ fnv(dst, dport) ^ uint32(proto)
	// fmix32 (MurmurHash3): every output bit depends on every input bit,
	// so the low bits that pick a queue or a bucket are well spread.
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// fnv is FNV-1a over an address and a port.
func fnv(addr, port []byte) uint32 {
	const prime = 16777619
	h := uint32(2166136261)
	for _, c := range addr {
		h = (h ^ uint32(c)) * prime
	}
	for _, c := range port {
		h = (h ^ uint32(c)) * prime
	}
	return h
}
