// Package api defines tulled's local contracts: the status API (HTTP over
// the unix socket RUN_DIR/tulled.sock) with a client for it, and
// RUN_DIR/subnet.json for the CNI plugin. tullectl, the CNI plugin, the
// demo, the tests and the benchmark harness read tulled through it. Its
// types are its own: a client links neither the datapath nor the stores.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// SocketName is the status socket's file name inside the run directory.
const SocketName = "tulled.sock"

// StatusPath is the status document's URL path.
const StatusPath = "/v1/status"

// Status is the document GET /v1/status returns.
type Status struct {
	Node    string `json:"node"`
	Version string `json:"version"`
	PID     int    `json:"pid"`
	// NotReady says why tulled is not ready (e.g. the Kubernetes API is
	// unreachable; it forwards with the last known peers meanwhile).
	NotReady string            `json:"notReady,omitempty"`
	Lease    Lease             `json:"lease"`
	MTU      int               `json:"mtu"`
	Uptime   string            `json:"uptime"`
	Peers    []Peer            `json:"peers"`
	Counters map[string]uint64 `json:"counters"`
	// WireGuard is this node's WireGuard identity, when it speaks it.
	WireGuard *WireGuardNode `json:"wireguard,omitempty"`
}

// WireGuardNode is this node's WireGuard identity and where it runs.
type WireGuardNode struct {
	PublicKey   string `json:"publicKey"`
	Fingerprint string `json:"fingerprint"`
	Port        uint16 `json:"port"`
	// Mode is "userspace" (tulled's datapath) or "kernel" (a WireGuard
	// device tulled programs).
	Mode string `json:"mode"`
}

// Lease is the node's lease as the status reports it.
type Lease struct {
	Node       string       `json:"node"`
	Subnet     netip.Prefix `json:"subnet,omitzero"`
	IPv6Subnet netip.Prefix `json:"ipv6Subnet,omitzero"`
	PublicIP   netip.Addr   `json:"publicIP,omitzero"`
	PublicIPv6 netip.Addr   `json:"publicIPv6,omitzero"`
	Backend    string       `json:"backend"`
	Port       uint16       `json:"port,omitempty"`
	Renewed    time.Time    `json:"renewed,omitzero"`
	Expiration time.Time    `json:"expiration"`
}

// Subnets returns the lease's valid subnets, IPv4 first.
func (l *Lease) Subnets() []netip.Prefix {
	var s []netip.Prefix
	for _, p := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
		if p.IsValid() {
			s = append(s, p)
		}
	}
	return s
}

// Peer is one peer node as the datapath sees it.
type Peer struct {
	Name string `json:"name"`
	// Endpoint is the underlay address and port of the peer's userspace
	// path (udp, or VXLAN in userspace): where its traffic through tulled
	// goes to and must come from.
	Endpoint netip.AddrPort `json:"endpoint,omitzero"`
	Subnets  []netip.Prefix `json:"subnets"`
	// Backend serves the peer ("" when none can); Reason says why.
	Backend string `json:"backend"`
	// Userspace is set when tulled's datapath speaks the backend (VXLAN
	// without the kernel's device).
	Userspace bool   `json:"userspace,omitempty"`
	Reason    string `json:"reason"`
	// WireGuard is the peer's WireGuard state when WireGuard serves it.
	WireGuard *WireGuardPeer `json:"wireguard,omitempty"`
	// Traffic is what tulled's datapath carried to and from the peer
	// (nothing for a peer a kernel path serves).
	Traffic *PeerTraffic `json:"traffic,omitempty"`
}

// PeerTraffic counts one peer's traffic through the datapath since tulled
// started. A TSO super-packet counts as one frame.
type PeerTraffic struct {
	TxFrames uint64 `json:"txFrames"`
	TxBytes  uint64 `json:"txBytes"`
	RxFrames uint64 `json:"rxFrames"`
	RxBytes  uint64 `json:"rxBytes"`
	// Drops are frames from the peer the datapath refused.
	Drops    uint64    `json:"drops"`
	LastSeen time.Time `json:"lastSeen,omitzero"`
}

// WireGuardPeer is what the status tells of a WireGuard peer.
type WireGuardPeer struct {
	PublicKey   string `json:"publicKey"`
	Fingerprint string `json:"fingerprint"`
	// Endpoint is where the peer is reached now (it may have roamed from
	// the published one).
	Endpoint      netip.AddrPort `json:"endpoint,omitzero"`
	LastHandshake time.Time      `json:"lastHandshake,omitzero"`
	RxBytes       uint64         `json:"rxBytes"`
	TxBytes       uint64         `json:"txBytes"`
	// Refused says why WireGuard serves no traffic to or from the peer
	// (it shares its key or endpoint with another peer, or carries this
	// node's key); empty when it does.
	Refused string `json:"refused,omitempty"`
}

// RotateKeyPath is where a POST rotates the node's WireGuard key.
const RotateKeyPath = "/v1/wireguard/rotate-key"

// RotatedKey is what a key rotation answers: the new public key, already
// in the key file and being published with the lease.
type RotatedKey struct {
	PublicKey   string `json:"publicKey"`
	Fingerprint string `json:"fingerprint"`
	// OldKeyGrace is how long the old key still answers handshakes from
	// peers that have not learned the new one (0: not at all).
	OldKeyGrace time.Duration `json:"oldKeyGrace"`
}

func client(socket string) *http.Client { return clientTimeout(socket, 10*time.Second) }

func clientTimeout(socket string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
}

// RotateKey asks the tulled at socket for a new WireGuard key; with now,
// the old key answers no handshake from then on (no grace).
func RotateKey(ctx context.Context, socket string, now bool) (*RotatedKey, error) {
	path := RotateKeyPath
	if now {
		path += "?now=true"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://tulled"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client(socket).Do(req)
	if err != nil {
		return nil, fmt.Errorf("tulled at %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b [512]byte
		n, _ := resp.Body.Read(b[:])
		return nil, fmt.Errorf("tulled at %s: %s: %s", socket, resp.Status, strings.TrimSpace(string(b[:n])))
	}
	var k RotatedKey
	if err := json.NewDecoder(resp.Body).Decode(&k); err != nil {
		return nil, fmt.Errorf("tulled at %s: %w", socket, err)
	}
	return &k, nil
}

// Get fetches the status from the socket at path.
func Get(ctx context.Context, socket string) (*Status, error) {
	var st Status
	if err := getJSON(ctx, socket, StatusPath, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// getJSON decodes the document GET path answers into v.
func getJSON(ctx context.Context, socket, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://tulled"+path, nil)
	if err != nil {
		return err
	}
	resp, err := client(socket).Do(req)
	if err != nil {
		return fmt.Errorf("tulled at %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("tulled at %s: %s", socket, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("tulled at %s: %w", socket, err)
	}
	return nil
}

// PolicyPath is where GET returns the NetworkPolicy state of the node's
// pods (PolicyStatus).
const PolicyPath = "/v1/policy"

// AttachPath is where the CNI plugin POSTs an Attachment on ADD (and
// DELETEs it on DEL); a POST answers once the pod's policy rules are in
// place.
const AttachPath = "/v1/policy/attachments"

// Attachment is a pod the CNI plugin attached on this node.
type Attachment struct {
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	UID         string       `json:"uid,omitempty"`
	ContainerID string       `json:"containerID"`
	IPs         []netip.Addr `json:"ips"`
}

// PolicyStatus is the node's NetworkPolicy enforcement.
type PolicyStatus struct {
	// Enabled is false when tulled runs without NetworkPolicy
	// (--network-policy=false, or no Kubernetes API).
	Enabled bool `json:"enabled"`
	// Synced is set once the rules reflect the API server's state.
	Synced bool `json:"synced"`
	// Applied is when the table last changed; Error why the last change
	// failed ("" when it did not).
	Applied time.Time `json:"applied,omitzero"`
	Error   string    `json:"error,omitempty"`
	// Pods are the local pods, each with what selects it and what it may do.
	Pods []PodPolicy `json:"pods"`
	// Problems are policy content tulled cannot enforce as written (it
	// then allows less, never more).
	Problems []PolicyProblem `json:"problems,omitempty"`
}

// PodPolicy is one local pod's effective policy.
type PodPolicy struct {
	Pod             string       `json:"pod"`
	IPs             []netip.Addr `json:"ips"`
	IngressIsolated bool         `json:"ingressIsolated"`
	EgressIsolated  bool         `json:"egressIsolated"`
	Policies        []string     `json:"policies,omitempty"`
	// Ingress and Egress are the allow lists when isolated (empty and
	// isolated: nothing is allowed).
	Ingress []PolicyRule `json:"ingress,omitempty"`
	Egress  []PolicyRule `json:"egress,omitempty"`
}

// PolicyRule is one rule of a policy as resolved: peers as addresses and
// ranges ("any" for all), ports as protocol/number, protocol/range or
// protocol/name (none: every port).
type PolicyRule struct {
	Policy string   `json:"policy"`
	Peers  []string `json:"peers"`
	Ports  []string `json:"ports,omitempty"`
}

// PolicyProblem is content of a policy that could not be enforced.
type PolicyProblem struct {
	Policy  string `json:"policy"`
	Message string `json:"message"`
}

// ErrUnreachable is returned when no tulled answers on the socket.
var ErrUnreachable = errors.New("tulled not reachable")

// Attach tells the tulled at socket about a pod the CNI plugin attached,
// and returns once the pod's NetworkPolicy rules are in place (or at once
// when tulled enforces none).
func Attach(ctx context.Context, socket string, a Attachment) error {
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://tulled"+AttachPath, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return do(clientTimeout(socket, 40*time.Second), req, socket)
}

// Detach tells the tulled at socket that a container's pod is gone.
func Detach(ctx context.Context, socket, containerID string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, "http://tulled"+AttachPath+"?containerID="+url.QueryEscape(containerID), nil)
	if err != nil {
		return err
	}
	return do(client(socket), req, socket)
}

func do(c *http.Client, req *http.Request, socket string) error {
	resp, err := c.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w at %s: %v", ErrUnreachable, socket, err)
		}
		return fmt.Errorf("tulled at %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var b [512]byte
		n, _ := io.ReadFull(resp.Body, b[:])
		return fmt.Errorf("tulled at %s: %s: %s", socket, resp.Status, strings.TrimSpace(string(b[:n])))
	}
	return nil
}

// GetPolicy fetches the node's NetworkPolicy state.
func GetPolicy(ctx context.Context, socket string) (*PolicyStatus, error) {
	var ps PolicyStatus
	if err := getJSON(ctx, socket, PolicyPath, &ps); err != nil {
		return nil, err
	}
	return &ps, nil
}
