package wireguard

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/curve25519"

	"github.com/tulle-net/tulle/internal/atomicfile"
)

// KeyLen is the length of every WireGuard key.
const KeyLen = 32

// Key is a Curve25519 private or public key, or a pre-shared key.
type Key [KeyLen]byte

// String is the key in base64, as wg(8) writes it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// IsZero reports whether k is all zeros (no key).
func (k Key) IsZero() bool { return subtle.ConstantTimeCompare(k[:], make([]byte, KeyLen)) == 1 }

// Fingerprint is a short form of a public key for people: its first 10
// base64 characters, as wg(8) users recognise keys.
func (k Key) Fingerprint() string { return k.String()[:10] }

// ParseKey reads a base64 key.
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return k, fmt.Errorf("key is not base64: %w", err)
	}
	if len(b) != KeyLen {
		return k, fmt.Errorf("key is %d bytes, want %d", len(b), KeyLen)
	}
	copy(k[:], b)
	return k, nil
}

// NewPrivateKey returns a random, clamped Curve25519 private key.
func NewPrivateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return k, err
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// Public returns the public key of private key k.
func (k Key) Public() Key {
	var p Key
	curve25519.ScalarBaseMult((*[32]byte)(&p), (*[32]byte)(&k))
	return p
}

// dh is X25519; it fails for a low-order point (an all-zero result).
func dh(priv, pub Key) ([32]byte, error) {
	var out [32]byte
	r, err := curve25519.X25519(priv[:], pub[:])
	if err != nil {
		return out, errLowOrder
	}
	copy(out[:], r)
	return out, nil
}

var errLowOrder = errors.New("low-order public key")

// LoadOrCreateKey reads the private key at path, or creates one there
// (mode 0600, written atomically) when there is none. A key file others
// can read is refused: it is the node's identity.
func LoadOrCreateKey(path string) (k Key, created bool, err error) {
	k, err = ReadKeyFile(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return k, false, err
	}
	if k, err = NewPrivateKey(); err != nil {
		return k, false, fmt.Errorf("generate key: %w", err)
	}
	if err := WriteKeyFile(path, k); err != nil {
		return k, false, err
	}
	return k, true, nil
}

// ReadKeyFile reads a base64 key from a file that only its owner may read.
func ReadKeyFile(path string) (Key, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Key{}, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return Key{}, fmt.Errorf("key file %s has mode %04o: it must be readable by its owner only (chmod 0600)", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return Key{}, err
	}
	k, err := ParseKey(string(b))
	if err != nil {
		return Key{}, fmt.Errorf("key file %s: %w", path, err)
	}
	return k, nil
}

// ReadPSKFile reads a pre-shared key (base64, as `wg genpsk` writes it).
// Unlike the private key it is usually a mounted Secret, whose mode the
// node does not choose, so the mode is not checked.
func ReadPSKFile(path string) (Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Key{}, err
	}
	k, err := ParseKey(string(b))
	if err != nil {
		return Key{}, fmt.Errorf("pre-shared key file %s: %w", path, err)
	}
	if k.IsZero() {
		return Key{}, fmt.Errorf("pre-shared key file %s: all zeros", path)
	}
	return k, nil
}

// WriteKeyFile writes k to path with mode 0600, atomically, so a crash
// never leaves half a key and the key is never readable by others.
func WriteKeyFile(path string, k Key) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("key dir: %w", err)
	}
	if err := atomicfile.Write(path, []byte(k.String()+"\n"), 0o600); err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	return nil
}
