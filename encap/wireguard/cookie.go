package wireguard

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/crypto/blake2s"
	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/time/rate"
)

// cookieRefresh is how long a cookie secret, and a cookie received, live.
const cookieRefresh = 120 * time.Second

// cookieJar makes the cookies this node asks initiators for when under
// load (the paper's §5.4.7): a MAC of the sender's address under a secret
// that changes every two minutes.
type cookieJar struct {
	mu      sync.Mutex
	secret  [32]byte
	created time.Time
}

func (j *cookieJar) cookie(src netip.AddrPort, now time.Time) [16]byte {
	j.mu.Lock()
	if now.Sub(j.created) > cookieRefresh {
		rand.Read(j.secret[:])
		j.created = now
	}
	secret := j.secret
	j.mu.Unlock()
	var b [18]byte
	a := src.Addr().As16()
	copy(b[:], a[:])
	binary.BigEndian.PutUint16(b[16:], src.Port())
	return mac(secret[:], b[:])
}

// createCookieReply answers handshake message msg (from src) with a
// cookie reply, written to out (cookieSize bytes).
func (j *cookieJar) createCookieReply(out, msg []byte, us *keyMaterial, src netip.AddrPort, now time.Time) {
	c := j.cookie(src, now)
	binary.LittleEndian.PutUint32(out[0:], typeCookie)
	copy(out[4:8], msg[4:8]) // the sender's index
	nonce := out[8:32]
	rand.Read(nonce)
	m1, m2 := macs(msg)
	a, _ := chacha20poly1305.NewX(us.cookieKey[:])
	a.Seal(out[32:32], nonce, c[:], msg[m1:m2])
}

// consumeCookieReply decrypts a cookie reply from peerPub to a message
// whose mac1 was lastMAC1.
func consumeCookieReply(msg []byte, peerPub Key, lastMAC1 [16]byte) ([16]byte, error) {
	var c [16]byte
	key := blake2s.Sum256(append([]byte(labelCookie), peerPub[:]...))
	a, _ := chacha20poly1305.NewX(key[:])
	if _, err := a.Open(c[:0], msg[8:32], msg[32:64], lastMAC1[:]); err != nil {
		return c, errDecrypt
	}
	return c, nil
}

// rateLimiter bounds handshakes per source while under load, as
// wireguard-go's ratelimiter does: a token bucket (x/time/rate) per IPv4
// address or IPv6 /64 (one host holds a whole /64), swept of buckets idle
// for limiterIdle once per limiterIdle. A full bucket and a forgotten one
// allow the same, so the sweep forgets nothing that matters. At most
// maxEntries sources are tracked; past that, new sources are refused
// until the sweep frees room, so a flood of sources neither grows memory
// nor resets the buckets of the sources already limited.
type rateLimiter struct {
	mu      sync.Mutex
	buckets map[netip.Prefix]*bucket
	swept   time.Time
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

const (
	handshakeRate  = 20 // per second per source, under load
	handshakeBurst = 5
	limiterIdle    = time.Second
	maxEntries     = 1 << 16
)

// source is the rate limiter's key for a: an IPv4 address or an IPv6 /64.
func source(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

func (r *rateLimiter) allow(a netip.Addr, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.buckets == nil {
		r.buckets = map[netip.Prefix]*bucket{}
	}
	if now.Sub(r.swept) >= limiterIdle {
		for k, b := range r.buckets {
			if now.Sub(b.last) >= limiterIdle {
				delete(r.buckets, k)
			}
		}
		r.swept = now
	}
	k := source(a)
	b := r.buckets[k]
	if b == nil {
		if len(r.buckets) >= maxEntries {
			return false
		}
		b = &bucket{lim: rate.NewLimiter(handshakeRate, handshakeBurst)}
		r.buckets[k] = b
	}
	b.last = now
	return b.lim.AllowN(now, 1)
}
