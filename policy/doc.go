// Package policy enforces Kubernetes NetworkPolicy (networking.k8s.io/v1)
// on one node with nftables.
//
// It owns one table, inet "tulle-policy", and nothing else: no routes, no
// other tables, no conntrack entries. Its inputs are the cluster's Pods,
// Namespaces and NetworkPolicies (from informers) and the pods the CNI
// plugin attaches on this node (Attach, before ADD returns); its output
// is that table, changed in place by one atomic transaction per change.
//
// What it enforces, where: a local pod's ingress and egress are both
// judged on this node, in the forward hook (after kube-proxy's DNAT, so a
// Service is judged by the endpoint it reaches). Pod-to-pod traffic on the
// same node crosses tulle-br0 at L2 and reaches the forward hook through
// br_netfilter (the CNI plugin turns nf_call_iptables on for that bridge);
// one pass judges the sender's egress and the receiver's ingress. Traffic
// the node itself sends or receives (kubelet probes, hostNetwork pods)
// never crosses the forward hook and is never judged, as the API says.
//
// Layout of the table (see Render):
//
//	egress, ingress   base chains on forward; established and related pass,
//	                  a local address no pod holds is dropped, an isolated
//	                  pod's address jumps (vmap) to its pod chain
//	pod-<id>-in/eg    one per isolated local pod: a jump per policy that
//	                  selects it, then the drop
//	pol-<id>-in/eg    one per policy: an accept per rule, peers and ports
//	                  as sets
//	*-drop            the drops, counted
package policy
