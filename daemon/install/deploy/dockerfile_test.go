package deploy_test

import (
	"debug/elf"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

const repoRoot = "../../.."

// dockerfile is the parts of the Dockerfile the tests check. No Docker
// engine here: the image itself is never built in tests.
type dockerfile struct {
	builder  string   // image of the build stage
	build    string   // the RUN line with "go build", continuations joined
	packages []string // ./cmd/... packages it builds
	copied   []string // binaries copied into the final image
	copyDest string
}

func parseDockerfile(t *testing.T) dockerfile {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(raw), "\\\n", " ")
	var d dockerfile
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "FROM" && d.builder == "":
			d.builder = f[1]
		case len(f) > 0 && f[0] == "RUN" && strings.Contains(line, "go build"):
			d.build = line
			for _, w := range f {
				if strings.HasPrefix(w, "./cmd/") {
					d.packages = append(d.packages, w)
				}
			}
		case len(f) >= 3 && f[0] == "COPY" && f[1] == "--from=build":
			d.copied = f[2 : len(f)-1]
			d.copyDest = f[len(f)-1]
		}
	}
	return d
}

func TestDockerfile(t *testing.T) {
	d := parseDockerfile(t)

	// The builder's Go matches go.mod's go line.
	gomod, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("no go line in go.mod")
	}
	if d.builder != "golang:"+string(m[1]) {
		t.Errorf("builder image %q, go.mod wants Go %s", d.builder, m[1])
	}

	if !strings.Contains(d.build, "CGO_ENABLED=0") {
		t.Errorf("the build must be static (CGO_ENABLED=0): %s", d.build)
	}
	slices.Sort(d.packages)
	if want := []string{"./cmd/meshlane-agent", "./cmd/meshlane-cni", "./cmd/meshlanectl"}; !slices.Equal(d.packages, want) {
		t.Errorf("the Dockerfile builds %v, want %v", d.packages, want)
	}
	for _, p := range d.packages {
		if name := packageName(t, filepath.Join(repoRoot, p)); name != "main" {
			t.Errorf("%s is package %q, not a command", p, name)
		}
		if !slices.Contains(d.copied, "/out/"+path.Base(p)) {
			t.Errorf("%s is built but not copied into the image (COPY %v)", p, d.copied)
		}
	}

	// The DaemonSet runs and copies the binaries from where the image has
	// them.
	var ds appsv1.DaemonSet
	readManifest(t, "daemonset.yaml", &ds)
	c := ds.Spec.Template.Spec.Containers[0]
	if dir := filepath.Dir(c.Command[0]) + "/"; dir != d.copyDest {
		t.Errorf("the DaemonSet runs %s, the image puts the binaries in %s", c.Command[0], d.copyDest)
	}
	if src := argMap(t, c.Args)["--plugin-src"]; filepath.Dir(src)+"/" != d.copyDest {
		t.Errorf("--plugin-src %s is not where the image puts meshlane-cni (%s)", src, d.copyDest)
	}
}

// packageName reads the package clause of the Go files in dir.
func packageName(t *testing.T, dir string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.PackageClauseOnly)
		if err != nil {
			t.Fatal(err)
		}
		return af.Name.Name
	}
	t.Fatalf("no Go files in %s", dir)
	return ""
}

// TestDockerfileBinariesAreStatic builds what the Dockerfile builds, the
// way it builds it, and checks the binaries need no dynamic loader: the
// image has no libc and meshlane-cni runs on any node.
func TestDockerfileBinariesAreStatic(t *testing.T) {
	if testing.Short() {
		t.Skip("builds both commands")
	}
	d := parseDockerfile(t)
	out := t.TempDir()
	args := append([]string{"build", "-o", out + "/"}, d.packages...)
	cmd := exec.Command("go", args...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	for _, p := range d.packages {
		bin := filepath.Join(out, path.Base(p))
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s asks for a dynamic loader", bin)
			}
		}
		if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
			t.Errorf("%s links %v", bin, libs)
		}
		f.Close()
	}
}
