package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/tulle-net/tulle/internal/atomicfile"
)

// SubnetFileName is the file in tulled's run directory that tells the CNI
// plugin the node's lease. tulled writes it atomically once it holds a
// lease and keeps it across restarts; `tulled cleanup` removes it.
const SubnetFileName = "subnet.json"

// SubnetFile is the document in SubnetFileName.
type SubnetFile struct {
	Network     netip.Prefix `json:"network,omitzero"`
	Subnet      netip.Prefix `json:"subnet,omitzero"`
	IPv6Network netip.Prefix `json:"ipv6Network,omitzero"`
	IPv6Subnet  netip.Prefix `json:"ipv6Subnet,omitzero"`
	MTU         int          `json:"mtu"`
}

// ErrNoLease means tulled has not written a lease yet.
var ErrNoLease = errors.New("tulled holds no lease yet")

// ReadSubnetFile reads and checks RUN_DIR/subnet.json.
func ReadSubnetFile(runDir string) (*SubnetFile, error) {
	path := filepath.Join(runDir, SubnetFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", path, ErrNoLease)
	}
	if err != nil {
		return nil, err
	}
	var s SubnetFile
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if !s.Subnet.IsValid() && !s.IPv6Subnet.IsValid() {
		return nil, fmt.Errorf("%s: no subnet", path)
	}
	if s.Subnet.IsValid() && !s.Network.Contains(s.Subnet.Addr()) || s.IPv6Subnet.IsValid() && !s.IPv6Network.Contains(s.IPv6Subnet.Addr()) {
		return nil, fmt.Errorf("%s: subnet outside its network", path)
	}
	if s.MTU < 576 || s.MTU > 65535 {
		return nil, fmt.Errorf("%s: MTU %d out of range", path, s.MTU)
	}
	return &s, nil
}

// WriteSubnetFile writes RUN_DIR/subnet.json atomically.
func WriteSubnetFile(runDir string, s *SubnetFile) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(runDir, SubnetFileName), append(b, '\n'), 0o644)
}
