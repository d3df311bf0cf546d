package policy

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Pod is what policy needs of a pod: where it is, its labels, addresses
// and named ports.
type Pod struct {
	Namespace, Name string
	UID             types.UID
	Node            string
	Labels          map[string]string
	IPs             []netip.Addr
	HostNetwork     bool
	// Ports are the pod's named container ports.
	Ports []NamedPort
}

// Key is namespace/name.
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// NamedPort is a container port with a name.
type NamedPort struct {
	Name     string
	Protocol corev1.Protocol
	Port     int32
}

// PodFrom converts an API pod (nil when it has ended or has no node yet:
// a pod that will never send again holds no address).
func PodFrom(p *corev1.Pod) *Pod {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	out := &Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, Node: p.Spec.NodeName, Labels: p.Labels, HostNetwork: p.Spec.HostNetwork}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	add := func(cs []corev1.Container) {
		for _, c := range cs {
			for _, cp := range c.Ports {
				if cp.Name != "" {
					out.Ports = append(out.Ports, NamedPort{Name: cp.Name, Protocol: cmp.Or(cp.Protocol, corev1.ProtocolTCP), Port: cp.ContainerPort})
				}
			}
		}
	}
	add(p.Spec.Containers)
	// Sidecars (restartable init containers) serve for the pod's life.
	for _, c := range p.Spec.InitContainers {
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			add([]corev1.Container{c})
		}
	}
	return out
}

// State is everything a node's rules are made from.
type State struct {
	// Pods are all pods of the cluster tulle knows, local ones included.
	Pods []*Pod
	// Namespaces are the labels of every namespace by name.
	Namespaces map[string]map[string]string
	Policies   []*networkingv1.NetworkPolicy
	// Local are the pods attached on this node by address (the CNI
	// plugin's word, before the API server's).
	Local map[netip.Addr]*Pod
	// Subnets are the node's pod subnets: an address in them that no
	// local pod holds is dropped.
	Subnets []netip.Prefix
}

// localPods returns the distinct local pods, sorted by key.
func (s *State) localPods() []*Pod {
	seen := map[string]*Pod{}
	for _, p := range s.Local {
		seen[p.Key()] = p
	}
	out := make([]*Pod, 0, len(seen))
	for _, p := range seen {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *Pod) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}

// localAddrs returns the addresses of local pod p.
func (s *State) localAddrs(p *Pod) []netip.Addr {
	var a []netip.Addr
	for ip, q := range s.Local {
		if q.Key() == p.Key() {
			a = append(a, ip)
		}
	}
	slices.SortFunc(a, netip.Addr.Compare)
	return a
}
