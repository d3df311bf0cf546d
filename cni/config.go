// Package cni is tulle's CNI plugin (type "tulle", spec 1.1 and every older
// version down to 0.3.0): it attaches pods to the node bridge, gives them
// addresses from the node subnet tulled leased, and routes everything else
// through the node (and so through tulled's TUN device to other nodes).
//
// It owns: the node bridge and its gateway addresses, the pods' veth pairs
// (host side named from a hash of container ID and interface, so GC can find
// leftovers), the IPAM state under DataDir/<network name>, and one nftables
// table for masquerading. It reads tulled's RUN_DIR/subnet.json and status
// socket and never changes tulled's device or routes.
package cni

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// Defaults for NetConf fields.
const (
	DefaultRunDir  = "/run/tulle"
	DefaultBridge  = "tulle-br0"
	DefaultDataDir = "/var/lib/cni/tulle"
)

// Plugin error codes beyond the spec's (100+ are the plugin's own).
const (
	// ErrSubnetExhausted: every address of the node subnet is allocated.
	ErrSubnetExhausted uint = 100
)

// NetConf is the plugin's network configuration.
type NetConf struct {
	types.PluginConf
	// RunDir is tulled's run directory (subnet.json and tulled.sock).
	RunDir string `json:"runDir,omitempty"`
	// Bridge is the node bridge pods attach to.
	Bridge string `json:"bridge,omitempty"`
	// DataDir holds IPAM allocations, one directory per network name.
	DataDir string `json:"dataDir,omitempty"`
	// IPMasq masquerades pod traffic leaving the cluster network (default
	// true). Needs the nft binary.
	IPMasq *bool `json:"ipMasq,omitempty"`
	// HairpinMode lets a pod reach itself through a service IP (default true).
	HairpinMode *bool `json:"hairpinMode,omitempty"`
	// MTU overrides the MTU tulled announces (0: tulled's).
	MTU int `json:"mtu,omitempty"`
}

func (c *NetConf) ipMasq() bool  { return c.IPMasq == nil || *c.IPMasq }
func (c *NetConf) hairpin() bool { return c.HairpinMode == nil || *c.HairpinMode }

// LoadConf parses and validates the plugin configuration. Errors carry the
// spec's codes: 6 for undecodable JSON, 7 for an invalid configuration.
func LoadConf(b []byte) (*NetConf, error) {
	c := &NetConf{}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "failed to parse network configuration", err.Error())
	}
	if c.RunDir == "" {
		c.RunDir = DefaultRunDir
	}
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	bad := func(format string, a ...any) error {
		return types.NewError(types.ErrInvalidNetworkConfig, "invalid tulle network configuration", fmt.Sprintf(format, a...))
	}
	switch {
	case c.Name == "":
		return nil, bad("field name: missing")
	case strings.ContainsAny(c.Name, "/\x00") || c.Name == "." || c.Name == "..":
		return nil, bad("field name: %q cannot name a directory", c.Name)
	case len(c.Bridge) > 15 || strings.ContainsAny(c.Bridge, "/ \x00"):
		return nil, bad("field bridge: %q is not a valid interface name", c.Bridge)
	case c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535):
		return nil, bad("field mtu: %d out of range (576-65535, or 0 for tulled's)", c.MTU)
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "failed to parse prevResult", err.Error())
	}
	return c, nil
}

// checkMasqTools fails early (before anything is created) when ipMasq is
// on and nft is missing.
func (c *NetConf) checkMasqTools() error {
	if !c.ipMasq() {
		return nil
	}
	if _, err := exec.LookPath("nft"); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "ipMasq needs the nft binary", "install nftables or set \"ipMasq\": false")
	}
	return nil
}
