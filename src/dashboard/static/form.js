/* Trellis method console: a form for one gRPC method's request, built from
 * the schema the dashboard serves (dashboard::schema::method_form), and the
 * proto3 JSON it collects. Plain ES2020, no dependencies, no build step.
 *
 *   TrellisForm.render(container, schema, initialValue)
 *   TrellisForm.collect(container)
 *     -> {ok: true, value: {...proto3 JSON...}}
 *      | {ok: false, field: "items[0].quantity", message: "items[0].quantity: ..."}
 *
 * Field paths (each input's `name` and `data-field`) use JSON names:
 *   msisdn, plan.id, items[0].name, labels[0].key, labels[0].value.id
 * A map entry is addressed by its position, key and value apart, because
 * the key is itself an input. A oneof member's path is its own name.
 *
 * What is sent (proto3 semantics): an empty input, an unchecked box, an
 * enum left at its zero value, an unset message and an empty list are left
 * out. A proto3 `optional` field, a oneof member and a wrapper type can be
 * explicitly set to their zero value: their empty choice means "unset" (so
 * an optional or wrapped string cannot be set to "", nor bytes to empty).
 * Items of lists and map values are always sent; an empty number there is
 * an error rather than a silent 0.
 *
 * Each field's row (div.tf-field) has `data-row` set to the field's path,
 * to find its buttons: [data-row="items"] > div > .tf-add adds an item,
 * .tf-remove in an item removes it, .tf-toggle sets or clears a nested
 * message. A oneof's radios share a generated name; each has `data-oneof`
 * (the oneof's name) and `value` (the member's JSON name, '' for none).
 *
 * CSS hooks: .tf-form .tf-field .tf-type .tf-message .tf-list .tf-oneof
 * .tf-entry .tf-add .tf-remove .tf-toggle .unsupported, and .invalid (with
 * aria-invalid) on the input collect() rejected.
 */
(function () {
  'use strict';

  // ---- Types and conversions: pure functions, tested in node -------------

  const INT_RANGES = {};
  for (const k of ['int32', 'sint32', 'sfixed32']) INT_RANGES[k] = [-(2n ** 31n), 2n ** 31n - 1n];
  for (const k of ['uint32', 'fixed32']) INT_RANGES[k] = [0n, 2n ** 32n - 1n];
  for (const k of ['int64', 'sint64', 'sfixed64']) INT_RANGES[k] = [-(2n ** 63n), 2n ** 63n - 1n];
  for (const k of ['uint64', 'fixed64']) INT_RANGES[k] = [0n, 2n ** 64n - 1n];

  /** proto3 JSON writes 64-bit integers as strings (JavaScript numbers lose precision past 2^53). */
  const isInt64 = (kind) => /64$/.test(kind) && kind in INT_RANGES;

  /** The scalar each wrapper type carries; its JSON is that scalar's. */
  const WRAPPERS = {
    'google.protobuf.DoubleValue': 'double', 'google.protobuf.FloatValue': 'float',
    'google.protobuf.Int64Value': 'int64', 'google.protobuf.UInt64Value': 'uint64',
    'google.protobuf.Int32Value': 'int32', 'google.protobuf.UInt32Value': 'uint32',
    'google.protobuf.BoolValue': 'bool', 'google.protobuf.StringValue': 'string',
    'google.protobuf.BytesValue': 'bytes',
  };
  /** Well-known types entered as JSON text, with what to show in an empty box. */
  const JSON_TYPES = {
    'google.protobuf.Struct': '{"key": "value"}',
    'google.protobuf.Value': 'any JSON value',
    'google.protobuf.ListValue': '[1, "two"]',
    'google.protobuf.Any': '{"@type": "type.googleapis.com/pkg.Message", "field": "..."}',
  };
  const PLACEHOLDERS = {
    'google.protobuf.Timestamp': '2026-12-02T10:00:00Z',
    'google.protobuf.Duration': '1.5s',
    'google.protobuf.FieldMask': 'a.b,c',
  };
  const FLOAT_MAX = 3.4028234663852886e38;

  const ok = (value) => ({ ok: true, value });
  const bad = (message) => ({ ok: false, message });
  const quote = (text) => JSON.stringify(text);

  /** Parses an integer of `kind` (int32 … sfixed64): a number, or a decimal string for 64-bit kinds. */
  function parseInteger(kind, text) {
    const t = text.trim();
    if (!/^[+-]?\d+$/.test(t)) return bad(`${quote(text)} is not an integer`);
    const n = BigInt(t);
    const [min, max] = INT_RANGES[kind];
    if (n < 0n && min === 0n) return bad(`${quote(text)} is negative; ${kind} takes 0 to ${max}`);
    if (n < min || n > max) return bad(`${quote(text)} is out of range for ${kind} (${min} to ${max})`);
    return ok(isInt64(kind) ? n.toString() : Number(n));
  }

  /** Parses a double or float; NaN and ±Infinity are sent as the strings proto3 JSON uses. */
  function parseFloating(kind, text) {
    const t = text.trim();
    if (t === 'NaN' || t === 'Infinity' || t === '-Infinity') return ok(t);
    if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(t)) return bad(`${quote(text)} is not a number`);
    const n = Number(t);
    if (!Number.isFinite(n) || (kind === 'float' && Math.abs(n) > FLOAT_MAX)) {
      return bad(`${quote(text)} is out of range for ${kind}`);
    }
    return ok(n);
  }

  /** Checks base64, standard or URL-safe alphabet, padded or not (as proto3 JSON parsers accept). */
  function parseBytes(text) {
    const t = text.trim();
    const body = t.replace(/={1,2}$/, '');
    const padded = body.length !== t.length;
    if (!/^[A-Za-z0-9+/]*$/.test(body) && !/^[A-Za-z0-9_-]*$/.test(body)) {
      return bad(`${quote(text)} is not base64`);
    }
    if (body.length % 4 === 1 || (padded && t.length % 4 !== 0)) {
      return bad(`${quote(text)} is not base64: its length does not fit`);
    }
    return ok(t);
  }

  /** Checks an RFC 3339 time, e.g. 2026-12-02T10:00:00Z or 2026-12-02T12:00:00.5+02:00. */
  function parseTimestamp(text) {
    const t = text.trim();
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|([+-])(\d{2}):(\d{2}))$/.exec(t);
    const fail = bad(`${quote(text)} is not an RFC 3339 time like 2026-12-02T10:00:00Z`);
    if (!m) return fail;
    const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number);
    const leap = (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
    const daysIn = mo === 2 ? (leap ? 29 : 28) : [4, 6, 9, 11].includes(mo) ? 30 : 31;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > daysIn || h > 23 || mi > 59 || s > 59) return fail;
    if (m[9] && (Number(m[10]) > 23 || Number(m[11]) > 59)) return fail;
    return ok(t);
  }

  /** Checks a proto3 JSON duration: seconds with an `s`, e.g. 1.5s, -2s, 0.000000001s. */
  function parseDuration(text) {
    const t = text.trim();
    const m = /^-?(\d+)(\.\d{1,9})?s$/.exec(t);
    if (!m) return bad(`${quote(text)} is not a duration like 1.5s (seconds, then s)`);
    if (BigInt(m[1]) > 315576000000n) return bad(`${quote(text)} is longer than 10000 years`);
    return ok(t);
  }

  /** Checks a field mask: comma-separated paths of JSON names, e.g. a.b,c. */
  function parseFieldMask(text) {
    const paths = text.split(',').map((p) => p.trim()).filter((p) => p !== '');
    const badPath = paths.find((p) => !/^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$/.test(p));
    if (badPath !== undefined) return bad(`${quote(badPath)} is not a field path like a.b`);
    return ok(paths.join(','));
  }

  /** Parses the JSON text of a Struct, Value, ListValue or Any. */
  function parseJsonText(type, text) {
    let v;
    try {
      v = JSON.parse(text);
    } catch (e) {
      return bad(`is not JSON: ${e.message}`);
    }
    const isObject = v !== null && typeof v === 'object' && !Array.isArray(v);
    if (type === 'google.protobuf.Struct' && !isObject) return bad('must be a JSON object {…}');
    if (type === 'google.protobuf.ListValue' && !Array.isArray(v)) return bad('must be a JSON array […]');
    if (type === 'google.protobuf.Any' && !(isObject && typeof v['@type'] === 'string')) {
      return bad('must be a JSON object with "@type": "type.googleapis.com/<message name>"');
    }
    return ok(v);
  }

  /** Parses text as a scalar of `kind` (not enum: enums come from a select). */
  function parseScalar(kind, text) {
    if (kind in INT_RANGES) return parseInteger(kind, text);
    if (kind === 'double' || kind === 'float') return parseFloating(kind, text);
    if (kind === 'bytes') return parseBytes(text);
    if (kind === 'bool') {
      if (text === 'true' || text === 'false') return ok(text === 'true');
      return bad(`${quote(text)} is not true or false`);
    }
    return ok(text); // string
  }

  /** Parses text as the value of a well-known type that has one input. */
  function parseWellKnown(type, text) {
    if (type in WRAPPERS) return parseScalar(WRAPPERS[type], text);
    if (type in JSON_TYPES) return parseJsonText(type, text);
    if (type === 'google.protobuf.Timestamp') return parseTimestamp(text);
    if (type === 'google.protobuf.Duration') return parseDuration(text);
    if (type === 'google.protobuf.FieldMask') return parseFieldMask(text);
    return ok({}); // Empty
  }

  /** A map key as proto3 JSON writes it: always a string. */
  function parseMapKey(kind, text) {
    const r = parseScalar(kind, text);
    return r.ok ? ok(String(r.value)) : r;
  }

  /** How an initial JSON value reads in a text box. */
  function toText(v, jsonText) {
    if (v === undefined || v === null) return '';
    if (jsonText) return JSON.stringify(v, null, 2);
    return typeof v === 'string' ? v : String(v);
  }

  /** What a label says of a field's type, e.g. `repeated Plan`, `map<string, int64>`. */
  function describeType(field) {
    const one = (t) => (t.type ? t.type.split('.').pop() : t.kind);
    if (field.map) return `map<${one(field.map.key)}, ${one(field.map.value)}>`;
    return (field.repeated ? 'repeated ' : field.optional ? 'optional ' : '') + one(field);
  }

  // ---- Rendering ---------------------------------------------------------

  /** document.createElement with properties and children (text is never parsed as HTML). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') el.className = v;
      else if (k.startsWith('data-') || k.startsWith('aria-')) el.setAttribute(k, v);
      else el[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) el.append(c);
    return el;
  }

  const join = (prefix, name) => (prefix ? `${prefix}.${name}` : name);
  const initialOf = (obj, field) => {
    if (!obj || typeof obj !== 'object') return undefined;
    return field.json in obj ? obj[field.json] : obj[field.name];
  };
  const failAt = (input, path, message) => ({ ok: false, input, field: path, message: `${path}: ${message}` });

  /** Sets an input's path, as `name` and `data-field`. */
  function setName(input, path) {
    input.name = path;
    input.setAttribute('data-field', path);
  }

  /**
   * A control for one value of type `t` ({kind, type}) at `path`. `mode` is
   * how absence works: 'implicit' (proto3 field: empty or zero = left out),
   * 'optional' (explicit unset choice) or 'present' (list item, map value,
   * chosen oneof member: always sent). Returns {el, input, collect, setPath};
   * collect() gives {ok, value} with value undefined for "left out".
   */
  function valueControl(ctx, t, path, init, mode) {
    const { kind, type } = t;
    if (kind === 'message') return messageControl(ctx, type, path, init, mode);
    if (kind === 'enum') return enumControl(ctx, type, path, init, mode);
    const wrapped = kind === 'wkt' ? WRAPPERS[type] : undefined;
    if (kind === 'bool' && mode !== 'optional') {
      const input = h('input', { type: 'checkbox', checked: init === true || init === 'true' });
      return simple(input, path, () => ok(input.checked ? true : mode === 'present' ? false : undefined));
    }
    if (kind === 'bool' || wrapped === 'bool') {
      // Three states: unset, true, false.
      const input = h('select', {}, ...['', 'true', 'false'].filter((o) => o || mode !== 'present')
        .map((o) => h('option', { value: o, textContent: o || '(unset)' })));
      input.value = init === true ? 'true' : init === false ? 'false' : mode === 'present' ? 'false' : '';
      return simple(input, path, () => ok(input.value === '' ? undefined : input.value === 'true'));
    }
    if (kind === 'wkt' && (type === 'google.protobuf.Empty' || type === 'google.protobuf.NullValue')) {
      // Nothing to enter; present (or given) means set.
      const value = type === 'google.protobuf.Empty' ? {} : null;
      const set = mode === 'present' || (init !== undefined && init !== null);
      return { el: h('span', { class: 'tf-empty' }), input: null, collect: () => ok(set ? value : undefined), setPath() {} };
    }
    const jsonText = kind === 'wkt' && type in JSON_TYPES;
    const scalar = wrapped || (kind === 'wkt' ? null : kind);
    let input;
    if (jsonText) {
      input = h('textarea', { rows: 3, placeholder: JSON_TYPES[type], value: toText(init, true) });
    } else if (scalar && !isInt64(scalar) && scalar !== 'string' && scalar !== 'bytes') {
      // 32-bit integers and floats: a number box. A browser empties the value of
      // a number box holding non-numbers, so validity.badInput is checked too.
      input = h('input', { type: 'number', step: /^(double|float)$/.test(scalar) ? 'any' : '1', value: toText(init) });
    } else {
      const placeholder = PLACEHOLDERS[type] || (scalar === 'bytes' ? 'base64' : isInt64(scalar) ? 'integer' : '');
      input = h('input', { type: 'text', placeholder, value: toText(init) });
      if (isInt64(scalar)) input.inputMode = 'numeric';
    }
    return simple(input, path, () => {
      if (input.validity && input.validity.badInput) return bad('is not a number');
      const raw = input.value;
      const text = scalar === 'string' ? raw : raw.trim();
      if (text === '') {
        if (mode !== 'present') return ok(undefined);
        if (scalar === 'string' || scalar === 'bytes') return ok('');
        if (type === 'google.protobuf.FieldMask') return ok('');
        return bad('is empty: enter a value');
      }
      return scalar ? parseScalar(scalar, text) : parseWellKnown(type, text);
    });
  }

  /** A control around one input whose check returns {ok, value} or {ok: false, message}. */
  function simple(input, path, check) {
    const control = {
      el: input, input, path,
      setPath(p) { control.path = p; setName(input, p); },
      collect() {
        const r = check();
        return r.ok ? r : failAt(input, control.path, r.message);
      },
    };
    control.setPath(path);
    return control;
  }

  function enumControl(ctx, type, path, init, mode) {
    const values = ctx.schema.enums[type] || [];
    const input = h('select', {},
      mode === 'optional' ? h('option', { value: '', textContent: '(unset)' }) : null,
      ...values.map((v) => h('option', { value: v.name, textContent: `${v.name} (${v.number})` })));
    const byNumber = values.find((v) => v.number === init);
    if (typeof init === 'string' || byNumber) input.value = byNumber ? byNumber.name : init;
    return simple(input, path, () => {
      if (input.value === '') return ok(undefined);
      const chosen = values.find((v) => v.name === input.value);
      // proto3: the zero value is the default and is not sent, unless presence matters.
      return ok(mode === 'implicit' && chosen && chosen.number === 0 ? undefined : input.value);
    });
  }

  /**
   * A nested message. Where it may be absent it starts unset (unless the
   * initial value has it) behind a set/clear toggle, and its fields are built
   * only when set, so recursive types render one level at a time.
   */
  function messageControl(ctx, type, path, init, mode) {
    const box = h('fieldset', { class: 'tf-message' });
    let inner = null;
    let current = path;
    const build = (value) => {
      inner = fieldsControl(ctx, type, current, value);
      box.append(inner.el);
    };
    if (mode === 'present') {
      build(init);
    } else {
      const toggle = h('button', { type: 'button', class: 'tf-toggle' });
      const sync = () => { toggle.textContent = inner ? 'clear' : 'set'; };
      toggle.addEventListener('click', () => {
        if (inner) { inner.el.remove(); inner = null; } else build(undefined);
        sync();
      });
      box.append(toggle);
      if (init !== undefined && init !== null) build(init);
      sync();
    }
    return {
      el: box, input: null,
      setPath(p) { current = p; if (inner) inner.setPath(p); },
      collect() { return inner ? inner.collect() : ok(undefined); },
    };
  }

  /** The fields of a message `type` at `path` (the form itself, or a set nested message). */
  function fieldsControl(ctx, type, path, init) {
    const message = ctx.schema.messages[type];
    const el = h('div', { class: 'tf-fields' });
    const children = []; // {control, key(): json name or null}
    if (!message) {
      el.append(h('p', { class: 'unsupported', textContent: `${type} is not described by the contract` }));
    } else {
      const oneofsDone = new Set();
      for (const field of message.fields) {
        if (field.oneof) {
          if (oneofsDone.has(field.oneof)) continue;
          oneofsDone.add(field.oneof);
          const members = message.fields.filter((f) => f.oneof === field.oneof);
          const c = oneofControl(ctx, field.oneof, members, path, init);
          children.push(c);
          el.append(c.el);
        } else {
          const c = fieldControl(ctx, field, join(path, field.json), initialOf(init, field), 'implicit');
          children.push(c);
          el.append(c.el);
        }
      }
    }
    return {
      el, input: null,
      setPath(p) { path = p; for (const c of children) c.setPath(p); },
      collect() {
        const value = {};
        for (const c of children) {
          const r = c.collect();
          if (!r.ok) return r;
          if (r.value !== undefined) value[r.key] = r.value;
        }
        return ok(value);
      },
    };
  }

  /** One field with its label; setPath takes the parent's path, collect() adds the JSON key. */
  function fieldControl(ctx, field, path, init, mode) {
    const t = { kind: field.kind, type: field.type };
    const control = field.map ? mapControl(ctx, field.map, path, init)
      : field.repeated ? listControl(ctx, t, path, init)
        : valueControl(ctx, t, path, init, field.optional ? 'optional' : mode);
    const id = `tf${ctx.uid}-${++ctx.ids}`;
    if (control.input) control.input.id = id;
    const label = h('label', { htmlFor: control.input ? id : '', title: field.doc || '' },
      field.name, ' ', h('span', { class: 'tf-type', textContent: describeType(field) }));
    // data-row: the field's path on its whole row, to find its add/set buttons.
    const el = h('div', { class: 'tf-field', 'data-row': path }, label, control.el);
    return {
      el,
      setPath(parent) {
        el.setAttribute('data-row', join(parent, field.json));
        control.setPath(join(parent, field.json));
      },
      collect() {
        const r = control.collect();
        return r.ok ? { ok: true, key: field.json, value: r.value } : r;
      },
    };
  }

  /** Repeated field: a list of items, each always sent, with add and remove. */
  function listControl(ctx, t, path, init) {
    return itemsControl(path, Array.isArray(init) ? init : [], (itemPath, v) => {
      const c = valueControl(ctx, t, itemPath(), v, 'present');
      return { el: c.el, setPath: () => c.setPath(itemPath()), collect: () => c.collect() };
    }, (results) => ok(results.length ? results.map((r) => r.value) : undefined));
  }

  /** Map field: entries of a key input and a value control; keys must differ. */
  function mapControl(ctx, map, path, init) {
    const entries = init && typeof init === 'object' ? Object.entries(init) : [];
    return itemsControl(path, entries, (itemPath, entry) => {
      const [k, v] = entry || [undefined, undefined];
      const key = valueControl(ctx, map.key, `${itemPath()}.key`, k, 'present');
      const value = valueControl(ctx, map.value, `${itemPath()}.value`, v, 'present');
      return {
        el: h('span', { class: 'tf-entry' }, key.el, ' → ', value.el),
        setPath() { key.setPath(`${itemPath()}.key`); value.setPath(`${itemPath()}.value`); },
        collect() {
          const kr = key.collect();
          if (!kr.ok) return kr;
          const parsed = parseMapKey(map.key.kind, String(kr.value));
          if (!parsed.ok) return failAt(key.input, `${itemPath()}.key`, parsed.message);
          const vr = value.collect();
          return vr.ok ? { ok: true, value: [parsed.value, vr.value], input: key.input } : vr;
        },
      };
    }, (results) => {
      if (!results.length) return ok(undefined);
      const out = {};
      for (const r of results) {
        const [k, v] = r.value;
        if (k in out) return failAt(r.input, r.input.name, `the key ${quote(k)} is used twice`);
        out[k] = v;
      }
      return ok(out);
    });
  }

  /**
   * The list both repeated fields and maps use. `makeItem(itemPath, init)`
   * builds an item whose path can change (itemPath() reads it): removing an
   * item renumbers those after it. `finish(results)` turns the items' values
   * into {ok, value} for the field, or a failure.
   */
  function itemsControl(path, inits, makeItem, finish) {
    const list = h('ol', { class: 'tf-list', start: 0 });
    const items = [];
    let current = path;
    const add = (init) => {
      const item = { index: items.length };
      const itemPath = () => `${current}[${item.index}]`;
      item.inner = makeItem(itemPath, init);
      const remove = h('button', { type: 'button', class: 'tf-remove', textContent: 'remove' });
      remove.addEventListener('click', () => {
        items.splice(item.index, 1);
        item.li.remove();
        items.forEach((it, i) => { it.index = i; it.inner.setPath(); });
      });
      item.li = h('li', {}, item.inner.el, ' ', remove);
      items.push(item);
      list.append(item.li);
    };
    inits.forEach(add);
    const addButton = h('button', { type: 'button', class: 'tf-add', textContent: 'add' });
    addButton.addEventListener('click', () => add(undefined));
    return {
      el: h('div', {}, list, addButton), input: null,
      setPath(p) { current = p; items.forEach((it) => it.inner.setPath()); },
      collect() {
        const results = [];
        for (const it of items) {
          const r = it.inner.collect();
          if (!r.ok) return r;
          results.push(r);
        }
        return finish(results);
      },
    };
  }

  /** A oneof: radio buttons choose which member is set; only its input is built. */
  function oneofControl(ctx, name, members, path, init) {
    const group = `tf${ctx.uid}-oneof-${++ctx.ids}`;
    const box = h('fieldset', { class: 'tf-oneof' }, h('legend', { textContent: `one of ${name}` }));
    const slot = h('div', { class: 'tf-oneof-member' });
    let chosen = null; // {field, control}
    let parent = path;
    const choose = (field, value) => {
      if (chosen) chosen.control.el.remove();
      chosen = field ? { field, control: fieldControl(ctx, field, join(parent, field.json), value, 'present') } : null;
      if (chosen) slot.append(chosen.control.el);
    };
    const initial = members.find((f) => initialOf(init, f) != null);
    for (const field of [null, ...members]) {
      // Radios share a generated group name; data-oneof and value say what they choose.
      const radio = h('input', { type: 'radio', name: group, value: field ? field.json : '', checked: field === (initial || null) });
      radio.setAttribute('data-oneof', name);
      radio.addEventListener('change', () => { if (radio.checked) choose(field, undefined); });
      box.append(h('label', {}, radio, ' ', field ? field.name : '(none)'));
    }
    box.append(slot);
    if (initial) choose(initial, initialOf(init, initial));
    return {
      el: box,
      setPath(p) { parent = p; if (chosen) chosen.control.setPath(p); },
      collect() { return chosen ? chosen.control.collect() : { ok: true, key: null, value: undefined }; },
    };
  }

  // ---- Public API ---------------------------------------------------------

  const forms = new WeakMap(); // container -> root control
  let formCount = 0;

  /** Builds the form for `schema.input` in `container`, filled from `initialValue` (proto3 JSON or null). */
  function render(container, schema, initialValue) {
    container.textContent = '';
    forms.delete(container);
    if (!schema.supported) {
      container.append(h('p', { class: 'unsupported', textContent: schema.unsupported_reason || 'this method cannot be called from a form' }));
      return;
    }
    const ctx = { schema, uid: ++formCount, ids: 0 };
    const root = fieldsControl(ctx, schema.input, '', initialValue || {});
    root.el.classList.add('tf-form');
    container.append(root.el);
    forms.set(container, root);
  }

  /** Reads the form in `container`: the request as proto3 JSON, or the first invalid input. */
  function collect(container) {
    for (const el of container.querySelectorAll('.invalid')) {
      el.classList.remove('invalid');
      el.removeAttribute('aria-invalid');
    }
    const root = forms.get(container);
    if (!root) {
      const p = container.querySelector('p.unsupported');
      return { ok: false, field: '', message: p ? p.textContent : 'no form has been rendered here' };
    }
    const r = root.collect();
    if (r.ok) return { ok: true, value: r.value };
    if (r.input) {
      r.input.classList.add('invalid');
      r.input.setAttribute('aria-invalid', 'true');
    }
    return { ok: false, field: r.field, message: r.message };
  }

  if (typeof window !== 'undefined') window.TrellisForm = { render, collect };
  if (typeof module !== 'undefined' && module.exports) {
    module.exports = {
      render, collect, parseInteger, parseFloating, parseBytes, parseTimestamp, parseDuration,
      parseFieldMask, parseJsonText, parseScalar, parseWellKnown, parseMapKey, describeType, toText,
    };
  }
})();
