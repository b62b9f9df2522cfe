package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

// object is a JSON object decoded one level deep: its keys in file order
// and each value as raw bytes. Rewriting a config through it keeps every key
// meshlane does not know, and their order, so the diff a person sees after
// chaining is meshlane's entry and nothing else.
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

// decodeObject reads data as one JSON object. Errors name the place of a
// syntax error (line and column) so a person can find it in the file.
func decodeObject(data []byte) (*object, error) {
	// A first full decode gives precise syntax errors and rejects trailing
	// data, as the runtime's own json.Unmarshal does.
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, describeJSONError(data, err)
	}
	if probe == nil {
		return nil, errors.New("is JSON null, not an object")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil { // the opening brace, checked above
		return nil, describeJSONError(data, err)
	}
	o := &object{vals: make(map[string]json.RawMessage, len(probe))}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, describeJSONError(data, err)
		}
		key, _ := tok.(string) // object keys are always strings
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, describeJSONError(data, err)
		}
		// A repeated key keeps its first place and, like json.Unmarshal
		// in the runtime, its last value.
		o.set(key, v)
	}
	return o, nil
}

// set replaces the value of key, appending the key if it is new.
func (o *object) set(key string, v json.RawMessage) {
	if _, ok := o.vals[key]; !ok {
		o.keys = append(o.keys, key)
	}
	o.vals[key] = v
}

// encode writes the object back as indented JSON with a final newline.
func (o *object) encode() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, err := marshalString(k)
		if err != nil {
			return nil, err
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(o.vals[k])
	}
	b.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, b.Bytes(), "", "  "); err != nil {
		return nil, fmt.Errorf("encode the config: %w", err)
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// marshalString encodes s as a JSON string without HTML escaping, so keys
// come out as they were written.
func marshalString(s string) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// describeJSONError turns a decoding error into one that says where in the
// file the problem is.
func describeJSONError(data []byte, err error) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn) && int(syn.Offset) >= len(bytes.TrimRight(data, " \t\r\n")):
		return errors.New("invalid JSON: the file ends before the object does (empty or cut short)")
	case errors.As(err, &syn):
		line, col := position(data, syn.Offset)
		return fmt.Errorf("invalid JSON at line %d, column %d: %v", line, col, syn)
	case errors.As(err, &typ) && typ.Field == "":
		return fmt.Errorf("is a JSON %s, not an object", typ.Value)
	}
	return fmt.Errorf("invalid JSON: %w", err)
}

// position converts a byte offset to a 1-based line and column.
func position(data []byte, off int64) (line, col int) {
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(off) - (bytes.LastIndexByte(before, '\n') + 1)
	if col < 1 {
		col = 1
	}
	return line, col
}

// conflist is a network config list with its plugins kept raw.
type conflist struct {
	obj     *object
	plugins []json.RawMessage
}

// parseConflist decodes a .conflist and checks it the way the runtime's
// libcni does, so a file meshlane accepts is one the runtime loads.
func parseConflist(data []byte) (*conflist, error) {
	obj, err := decodeObject(data)
	if err != nil {
		return nil, err
	}
	raw, ok := obj.vals["plugins"]
	if !ok {
		// libcni would then read plugins from a directory named after the
		// network; meshlane's entry could not be placed last.
		return nil, errors.New(`has no "plugins" list (plugins kept in separate files are not supported)`)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, fmt.Errorf(`"plugins" is not a list: %w`, err)
	}
	if len(plugins) == 0 {
		return nil, errors.New(`"plugins" is empty`)
	}
	for i, p := range plugins {
		if !isObject(p) {
			return nil, fmt.Errorf("plugin %d is not a JSON object", i)
		}
	}
	if _, err := libcni.ConfListFromBytes(data); err != nil {
		return nil, fmt.Errorf("the runtime would refuse it too: %w", err)
	}
	return &conflist{obj: obj, plugins: plugins}, nil
}

// listFromConf turns a single-plugin .conf into a list holding that plugin,
// as libcni does when it loads a .conf: the list takes the plugin's name
// and cniVersion, and the plugin keeps every key it had.
func listFromConf(data []byte) (*conflist, error) {
	obj, err := decodeObject(data)
	if err != nil {
		return nil, err
	}
	if _, ok := obj.vals["plugins"]; ok {
		return nil, errors.New(`is a single-plugin config (.conf or .json) but has a "plugins" list: the runtime reads it as one plugin; rename it to .conflist if it is a list`)
	}
	if _, err := libcni.NetworkPluginConfFromBytes(data); err != nil {
		return nil, fmt.Errorf("the runtime would refuse it too: %w", err)
	}
	list := &object{vals: map[string]json.RawMessage{}}
	if v, ok := obj.vals["cniVersion"]; ok {
		list.set("cniVersion", v)
	}
	name, ok := obj.vals["name"]
	if !ok {
		// libcni gives the list an empty name; a list needs the key.
		name = json.RawMessage(`""`)
	}
	list.set("name", name)
	plugin := json.RawMessage(bytes.TrimSpace(data))
	return &conflist{obj: list, plugins: []json.RawMessage{plugin}}, nil
}

// isObject tells whether raw JSON is an object (not null, not a scalar).
func isObject(raw json.RawMessage) bool {
	t := bytes.TrimSpace(raw)
	return len(t) > 0 && t[0] == '{'
}

// isMeshlane tells whether a plugin entry is meshlane's. It decodes "type"
// the way libcni does (encoding/json into a struct field), so an entry the
// runtime would run as meshlane-cni is recognised as one.
func isMeshlane(raw json.RawMessage) bool {
	var p struct {
		Type string `json:"type"`
	}
	return json.Unmarshal(raw, &p) == nil && p.Type == PluginType
}

// others returns the plugins that are not meshlane's, in order.
func (l *conflist) others() []json.RawMessage {
	var out []json.RawMessage
	for _, p := range l.plugins {
		if !isMeshlane(p) {
			out = append(out, p)
		}
	}
	return out
}

// chain puts want as the last plugin and drops every other meshlane entry.
// It reports false when the list already ends with exactly want and holds
// no other meshlane entry: then nothing needs writing.
func (l *conflist) chain(want json.RawMessage) bool {
	kept := l.others()
	if len(kept) == len(l.plugins)-1 && isMeshlane(l.plugins[len(l.plugins)-1]) && sameJSON(l.plugins[len(l.plugins)-1], want) {
		return false
	}
	l.plugins = append(kept, want)
	return true
}

// unchain removes every meshlane entry and reports whether there was one.
func (l *conflist) unchain() (bool, error) {
	kept := l.others()
	if len(kept) == len(l.plugins) {
		return false, nil
	}
	if len(kept) == 0 {
		return false, errors.New("holds only meshlane-cni entries: it is no network of its own; delete the file if no runtime needs it")
	}
	l.plugins = kept
	return true, nil
}

// encode writes the list back, its plugins in place of the old ones.
func (l *conflist) encode() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, p := range l.plugins {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(p)
	}
	b.WriteByte(']')
	l.obj.set("plugins", b.Bytes())
	out, err := l.obj.encode()
	if err != nil {
		return nil, err
	}
	// Belt and braces: never write a file the runtime cannot load.
	if _, err := libcni.ConfListFromBytes(out); err != nil {
		return nil, fmt.Errorf("the rewritten list would not load (a meshlane bug; the file is left as it was): %w", err)
	}
	return out, nil
}

// sameJSON compares two JSON values by meaning: key order, whitespace and
// number spelling (1.0 and 1) aside.
func sameJSON(a, b json.RawMessage) bool {
	va, errA := decodeAny(a)
	vb, errB := decodeAny(b)
	return errA == nil && errB == nil && reflect.DeepEqual(va, vb)
}

func decodeAny(raw []byte) (any, error) {
	var v any
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

// entry is meshlane's plugin entry; its field order is the order in the
// file.
type entry struct {
	Type              string          `json:"type"`
	Capabilities      map[string]bool `json:"capabilities"`
	Socket            string          `json:"socket"`
	Timeout           string          `json:"timeout,omitempty"`
	FailPolicy        string          `json:"failPolicy"`
	LogLevel          string          `json:"logLevel"`
	ExcludeNamespaces []string        `json:"excludeNamespaces,omitempty"`
}

// pluginEntry returns meshlane's conflist entry for c (defaults applied).
func (c Config) pluginEntry() (json.RawMessage, error) {
	e := entry{
		Type:              PluginType,
		Capabilities:      map[string]bool{annotationsCapability: true, cgroupPathCapability: true},
		Socket:            c.Socket,
		FailPolicy:        c.FailPolicy,
		LogLevel:          c.LogLevel,
		ExcludeNamespaces: c.ExcludeNamespaces,
	}
	if c.Timeout > 0 {
		e.Timeout = c.Timeout.String()
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(e); err != nil {
		return nil, fmt.Errorf("install: encode the plugin entry: %w", err)
	}
	return json.RawMessage(strings.TrimSuffix(b.String(), "\n")), nil
}
