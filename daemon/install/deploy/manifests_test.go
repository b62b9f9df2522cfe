// Package deploy_test checks what deploys meshlane: the kustomize tree in
// manifests/ and the Dockerfile. It is a package of its own so that the
// Kubernetes and kustomize libraries stay out of the install package's test
// and fuzz binaries.
package deploy_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/install"
)

const manifests = "../../../manifests"

// decodeStrict decodes one Kubernetes object, refusing unknown and
// duplicate fields: a typo in a manifest fails here, not in a cluster.
func decodeStrict(t *testing.T, data []byte, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(data, into); err != nil {
		t.Fatalf("strict decode: %v\n%s", err, data)
	}
}

func readManifest(t *testing.T, name string, into any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(manifests, "base", name))
	if err != nil {
		t.Fatal(err)
	}
	decodeStrict(t, data, into)
}

func TestManifestNamespaceAndServiceAccount(t *testing.T) {
	var ns corev1.Namespace
	readManifest(t, "namespace.yaml", &ns)
	if ns.Kind != "Namespace" || ns.APIVersion != "v1" || ns.Name != "meshlane-system" {
		t.Errorf("namespace = %s %s %s", ns.APIVersion, ns.Kind, ns.Name)
	}
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Error("the namespace must admit privileged-level pods (hostNetwork, hostPath, capabilities)")
	}

	var sa corev1.ServiceAccount
	readManifest(t, "serviceaccount.yaml", &sa)
	if sa.Kind != "ServiceAccount" || sa.Namespace != "meshlane-system" || sa.Name != "meshlane-agent" {
		t.Errorf("service account = %s %s/%s", sa.Kind, sa.Namespace, sa.Name)
	}
	if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Error("the service account must not mount a token: the agent uses no API")
	}
}

func TestManifestDaemonSet(t *testing.T) {
	var ds appsv1.DaemonSet
	readManifest(t, "daemonset.yaml", &ds)
	checkAgentDaemonSet(t, &ds, "istio")
}

// checkAgentDaemonSet checks the properties the agent relies on.
func checkAgentDaemonSet(t *testing.T, ds *appsv1.DaemonSet, profile string) {
	t.Helper()
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" || ds.Namespace != "meshlane-system" || ds.Name != "meshlane-agent" {
		t.Fatalf("DaemonSet = %s %s %s/%s", ds.APIVersion, ds.Kind, ds.Namespace, ds.Name)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector label %s=%s not on the pod template", k, v)
		}
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType ||
		u.RollingUpdate == nil || u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("update strategy = %+v, want RollingUpdate with maxUnavailable 1", u)
	}
	tpl := ds.Spec.Template
	if tpl.Annotations["sidecar.istio.io/inject"] != "false" || tpl.Annotations["linkerd.io/inject"] != "disabled" {
		t.Errorf("pod template annotations %v must keep both meshes' injectors away", tpl.Annotations)
	}
	pod := tpl.Spec
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName = %q", pod.PriorityClassName)
	}
	if len(pod.Tolerations) != 1 || pod.Tolerations[0].Operator != corev1.TolerationOpExists ||
		pod.Tolerations[0].Key != "" || pod.Tolerations[0].Effect != "" {
		t.Errorf("tolerations = %+v, want one that tolerates every taint", pod.Tolerations)
	}
	if !pod.HostNetwork {
		t.Error("hostNetwork must be true")
	}
	if pod.NodeSelector["kubernetes.io/os"] != "linux" {
		t.Errorf("nodeSelector = %v", pod.NodeSelector)
	}
	if pod.ServiceAccountName != "meshlane-agent" || pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("service account %q, automount %v: want meshlane-agent without a token", pod.ServiceAccountName, pod.AutomountServiceAccountToken)
	}
	if pod.HostPID || pod.HostIPC {
		t.Error("the agent needs neither the host PID nor IPC namespace")
	}
	for _, v := range pod.Volumes {
		if v.HostPath != nil && strings.HasPrefix(v.HostPath.Path, "/proc") {
			t.Errorf("volume %s mounts the host's %s: the agent does not read it", v.Name, v.HostPath.Path)
		}
	}

	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want the agent only", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.Image != "ghcr.io/meshlane/meshlane:latest" || !slices.Equal(c.Command, []string{"/usr/local/bin/meshlane-agent"}) {
		t.Errorf("image %q command %q", c.Image, c.Command)
	}
	if c.Args[0] != "--profile="+profile || slices.ContainsFunc(c.Args[1:], func(a string) bool { return strings.HasPrefix(a, "--profile") }) {
		t.Errorf("args %q: want --profile=%s first and only once", c.Args, profile)
	}
	args := argMap(t, c.Args)
	for _, flag := range []string{"--install-cni"} {
		if _, ok := args[flag]; !ok {
			t.Errorf("args %q lack %s", c.Args, flag)
		}
	}
	if args["--plugin-src"] != "/usr/local/bin/"+install.PluginType {
		t.Errorf("--plugin-src = %q, want where the Dockerfile puts meshlane-cni", args["--plugin-src"])
	}
	if !slices.Contains(strings.Split(args["--cni-exclude-namespaces"], ","), "meshlane-system") {
		t.Errorf("--cni-exclude-namespaces = %q: must exempt meshlane-system", args["--cni-exclude-namespaces"])
	}

	checkPrivileges(t, c)

	// Every directory the agent is told about is the right host directory.
	mounts := hostMounts(t, pod, c)
	for flag, host := range map[string]string{
		"--cni-bin-dir":  "/opt/cni/bin",
		"--cni-conf-dir": "/etc/cni/net.d",
		"--cgroup":       "/sys/fs/cgroup",
	} {
		m, ok := mounts[args[flag]]
		if !ok || m.host != host {
			t.Errorf("%s=%s is not a mount of the host's %s (mounts %v)", flag, args[flag], host, mounts)
		}
	}
	for path, want := range map[string]corev1.MountPropagationMode{
		"/sys/fs/bpf":                   corev1.MountPropagationHostToContainer,
		"/var/run/netns":                corev1.MountPropagationHostToContainer,
		filepath.Dir(api.DefaultSocket): corev1.MountPropagationNone,
	} {
		m, ok := mounts[path]
		if !ok || m.host != path {
			t.Errorf("%s must be the host's %s (mounts %v)", path, path, mounts)
			continue
		}
		if want != corev1.MountPropagationNone && m.propagation != want {
			t.Errorf("%s propagation %q, want %q", path, m.propagation, want)
		}
	}
	if m := mounts["/host/etc/cni/net.d"]; m.readOnly {
		t.Error("the CNI config directory must be writable")
	}

	// Probes: HTTP on the probe address the agent is told to serve.
	probeHost, probePort, ok := strings.Cut(args["--probe-addr"], ":")
	if !ok {
		t.Fatalf("--probe-addr = %q", args["--probe-addr"])
	}
	for name, p := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("no httpGet probe for %s", name)
			continue
		}
		if p.HTTPGet.Path != name || p.HTTPGet.Host != probeHost || p.HTTPGet.Port.String() != probePort {
			t.Errorf("probe %s = %+v, want %s on %s", name, p.HTTPGet, name, args["--probe-addr"])
		}
	}
	if name := api.PathHealthz; c.LivenessProbe.HTTPGet.Path != name {
		t.Errorf("liveness path %s, the agent serves %s", c.LivenessProbe.HTTPGet.Path, name)
	}
	if name := api.PathReadyz; c.ReadinessProbe.HTTPGet.Path != name {
		t.Errorf("readiness path %s, the agent serves %s", c.ReadinessProbe.HTTPGet.Path, name)
	}

	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().String() != "50m" || req.Memory().String() != "64Mi" || lim.Memory().String() != "256Mi" {
		t.Errorf("resources = %+v", c.Resources)
	}
	if _, ok := lim[corev1.ResourceCPU]; ok {
		t.Error("a CPU limit throttles the agent and so every pod start")
	}
}

// checkPrivileges checks that a container holds exactly the capabilities
// the agent uses and nothing that makes it privileged, within what the API
// accepts.
func checkPrivileges(t *testing.T, c corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("container %s has no securityContext", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("container %s is privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("container %s must drop ALL capabilities first", c.Name)
	} else {
		got := slices.Clone(sc.Capabilities.Add)
		slices.Sort(got)
		if want := []corev1.Capability{"BPF", "NET_ADMIN", "SYS_ADMIN"}; !slices.Equal(got, want) {
			t.Errorf("container %s adds %v, want %v", c.Name, got, want)
		}
	}
	// API validation: allowPrivilegeEscalation=false cannot go with
	// SYS_ADMIN, and Bidirectional propagation needs privileged.
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		t.Errorf("container %s: allowPrivilegeEscalation false is refused together with SYS_ADMIN", c.Name)
	}
	for _, m := range c.VolumeMounts {
		if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("container %s mounts %s Bidirectional: the API admits that for privileged containers only", c.Name, m.MountPath)
		}
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("container %s must run as root (host directories, bpf)", c.Name)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("container %s should have a read-only root filesystem", c.Name)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("container %s: seccomp %v, want RuntimeDefault", c.Name, sc.SeccompProfile)
	}
	if sc.AppArmorProfile == nil || sc.AppArmorProfile.Type != corev1.AppArmorProfileTypeUnconfined {
		t.Errorf("container %s: the default AppArmor profile forbids writing pins under /sys/fs/bpf", c.Name)
	}
}

type mount struct {
	host        string
	propagation corev1.MountPropagationMode
	readOnly    bool
}

// hostMounts maps a container's mount paths to the host paths behind them,
// checking that every mount names a volume.
func hostMounts(t *testing.T, pod corev1.PodSpec, c corev1.Container) map[string]mount {
	t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	out := map[string]mount{}
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Errorf("mount %s names no volume %q", m.MountPath, m.Name)
			continue
		}
		if v.HostPath == nil {
			continue
		}
		mm := mount{host: v.HostPath.Path, readOnly: m.ReadOnly}
		if m.MountPropagation != nil {
			mm.propagation = *m.MountPropagation
		}
		out[m.MountPath] = mm
	}
	return out
}

// argMap splits "--flag=value" arguments; a bare "--flag" maps to "".
func argMap(t *testing.T, args []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, a := range args {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		k, v, _ := strings.Cut(a, "=")
		if _, dup := m[k]; dup {
			t.Errorf("argument %s given twice", k)
		}
		m[k] = v
	}
	return m
}

// render builds a kustomization with the kustomize library, as
// kubectl apply -k does, and decodes what it makes.
func render(t *testing.T, dir string) (ns corev1.Namespace, sa corev1.ServiceAccount, ds appsv1.DaemonSet) {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	kinds := map[string]int{}
	for _, r := range rm.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		kinds[r.GetKind()]++
		switch r.GetKind() {
		case "Namespace":
			decodeStrict(t, y, &ns)
		case "ServiceAccount":
			decodeStrict(t, y, &sa)
		case "DaemonSet":
			decodeStrict(t, y, &ds)
		default:
			t.Errorf("unexpected %s in %s", r.GetKind(), dir)
		}
	}
	if fmt.Sprint(kinds) != "map[DaemonSet:1 Namespace:1 ServiceAccount:1]" {
		t.Errorf("%s renders %v", dir, kinds)
	}
	return ns, sa, ds
}

func TestKustomizeBase(t *testing.T) {
	ns, sa, ds := render(t, manifests)
	if ns.Name != "meshlane-system" || sa.Name != "meshlane-agent" {
		t.Errorf("namespace %q service account %q", ns.Name, sa.Name)
	}
	checkAgentDaemonSet(t, &ds, "istio")
	// Every manifest file is part of the base.
	files, _ := filepath.Glob(filepath.Join(manifests, "base", "*.yaml"))
	if len(files) != 4 { // kustomization.yaml + three resources
		t.Errorf("manifests/base holds %v: a file not listed in kustomization.yaml is never applied", files)
	}
}

func TestKustomizeLinkerdOverlay(t *testing.T) {
	_, _, base := render(t, manifests)
	_, _, ds := render(t, filepath.Join(manifests, "linkerd"))
	checkAgentDaemonSet(t, &ds, "linkerd")
	// Nothing else differs from the base.
	ds.Spec.Template.Spec.Containers[0].Args[0] = "--profile=istio"
	a, _ := yaml.Marshal(base)
	b, _ := yaml.Marshal(ds)
	if string(a) != string(b) {
		t.Errorf("the linkerd overlay changes more than the profile:\n%s\nvs\n%s", a, b)
	}
}

func TestKustomizePodScopeOverlay(t *testing.T) {
	_, _, base := render(t, manifests)
	_, _, ds := render(t, filepath.Join(manifests, "pod-scope"))
	checkAgentDaemonSet(t, &ds, "istio")
	args := ds.Spec.Template.Spec.Containers[0].Args
	if len(args) == 0 || args[len(args)-1] != "--cgroup-scope=pod" {
		t.Fatalf("the pod-scope overlay's agent args %q do not end in --cgroup-scope=pod", args)
	}
	// Nothing else differs from the base.
	ds.Spec.Template.Spec.Containers[0].Args = args[:len(args)-1]
	a, _ := yaml.Marshal(base)
	b, _ := yaml.Marshal(ds)
	if string(a) != string(b) {
		t.Errorf("the pod-scope overlay changes more than the scope:\n%s\nvs\n%s", a, b)
	}
}

func TestKustomizeUninstallOverlay(t *testing.T) {
	_, _, base := render(t, manifests)
	_, _, ds := render(t, filepath.Join(manifests, "uninstall"))
	if ds.Name != base.Name || ds.Namespace != base.Namespace {
		t.Fatalf("the uninstaller must replace the agent DaemonSet %s/%s, got %s/%s", base.Namespace, base.Name, ds.Namespace, ds.Name)
	}
	pod := ds.Spec.Template.Spec
	if len(pod.InitContainers) != 1 {
		t.Fatalf("%d init containers, want the uninstaller", len(pod.InitContainers))
	}
	u := pod.InitContainers[0]
	agent := base.Spec.Template.Spec.Containers[0]
	if u.Image != agent.Image || !slices.Equal(u.Command, agent.Command) || len(u.Args) == 0 || u.Args[0] != "uninstall" {
		t.Errorf("uninstaller runs %s %q %q, want the agent image's meshlane-agent uninstall", u.Image, u.Command, u.Args)
	}
	checkPrivileges(t, u)
	args := argMap(t, u.Args)
	want := argMap(t, agent.Args)
	for _, f := range []string{"--cni-bin-dir", "--cni-conf-dir", "--cgroup"} {
		if args[f] != want[f] {
			t.Errorf("uninstaller %s=%q, the agent uses %q", f, args[f], want[f])
		}
	}
	got, wantMounts := hostMounts(t, pod, u), hostMounts(t, base.Spec.Template.Spec, agent)
	for _, p := range []string{"/host/opt/cni/bin", "/host/etc/cni/net.d", "/sys/fs/bpf", "/host/sys/fs/cgroup", "/var/run/meshlane"} {
		if got[p] != wantMounts[p] {
			t.Errorf("uninstaller mount %s = %+v, the agent has %+v", p, got[p], wantMounts[p])
		}
	}
	if len(pod.Containers) != 1 || pod.Containers[0].Image != "registry.k8s.io/pause:3.10" {
		t.Fatalf("containers = %+v, want only the pause container", pod.Containers)
	}
	p := pod.Containers[0]
	if sc := p.SecurityContext; sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Add) != 0 ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("the pause container must hold no privilege: %+v", p.SecurityContext)
	}
	if pod.PriorityClassName != "system-node-critical" || len(pod.Tolerations) != 1 || !pod.HostNetwork {
		t.Error("the uninstaller must reach every node the agent ran on")
	}
}
