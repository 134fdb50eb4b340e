// Browser checks of form.js's rendering: run by the Rust test
// `form_js_renders_and_collects_in_a_browser` in a page that defines
// SCHEMAS (method name -> dashboard::schema::method_form) and loads form.js.
// Results go to <pre id="result"> as JSON: {checks: [{name, pass, detail}],
// bodies: {method: collected value}}; the Rust side also parses each body
// with check_body, as the dashboard's server will.
(function () {
  'use strict';
  const checks = [];
  const bodies = {};
  const check = (name, pass, detail) => checks.push({ name, pass: !!pass, detail: JSON.stringify(detail) });
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

  function form(method, initial) {
    const div = document.createElement('div');
    document.body.append(div);
    TrellisForm.render(div, SCHEMAS[method], initial);
    return div;
  }
  const at = (div, path) => div.querySelector(`[data-field="${path}"]`);
  const row = (div, path) => div.querySelector(`[data-row="${path}"]`);
  const set = (div, path, value) => {
    const el = at(div, path);
    if (!el) throw new Error(`no input ${path}`);
    if (el.type === 'checkbox') el.checked = value; else el.value = value;
  };

  try {
    // A flat request: enum, int64, Timestamp.
    const usage = 'telco.usage.v1.UsageService/RecordUsage';
    let div = form(usage, null);
    check('inputs are named by JSON path', ['userId', 'type', 'quantity', 'occurredAt', 'idempotencyKey']
      .every((p) => at(div, p) && at(div, p).name === p), div.innerHTML.length);
    check('an enum is a select starting at its zero value', at(div, 'type').tagName === 'SELECT'
      && at(div, 'type').options[0].value === 'USAGE_TYPE_UNSPECIFIED', at(div, 'type').outerHTML);
    check('int64 is a text box', at(div, 'quantity').type === 'text', at(div, 'quantity').type);
    check('a Timestamp shows an example', at(div, 'occurredAt').placeholder === '2026-12-02T10:00:00Z',
      at(div, 'occurredAt').placeholder);
    check('labels carry the comment as title', row(div, 'quantity').querySelector('label').title.startsWith('How much'),
      row(div, 'quantity').querySelector('label').title);
    check('an empty form collects {}', same(TrellisForm.collect(div), { ok: true, value: {} }), TrellisForm.collect(div));
    set(div, 'userId', 'u1');
    set(div, 'type', 'USAGE_TYPE_DATA');
    set(div, 'quantity', '12x');
    let r = TrellisForm.collect(div);
    check('a bad integer is named', same(r, { ok: false, field: 'quantity', message: 'quantity: "12x" is not an integer' }), r);
    check('and marked', at(div, 'quantity').classList.contains('invalid')
      && at(div, 'quantity').getAttribute('aria-invalid') === 'true', at(div, 'quantity').outerHTML);
    set(div, 'quantity', '1500');
    set(div, 'occurredAt', '2026-12-02T10:00:00Z');
    r = TrellisForm.collect(div);
    check('a good form collects proto3 JSON', same(r, { ok: true, value: {
      userId: 'u1', type: 'USAGE_TYPE_DATA', quantity: '1500', occurredAt: '2026-12-02T10:00:00Z' } }), r);
    check('the mark is cleared', !div.querySelector('.invalid'), div.querySelectorAll('.invalid').length);
    bodies[usage] = r.value;
    const initial = { userId: 'u2', type: 'USAGE_TYPE_SMS', quantity: '3', idempotencyKey: 'k' };
    r = TrellisForm.collect(form(usage, initial));
    check('an initial value comes back unchanged', same(r, { ok: true, value: initial }), r);

    // Lists, maps, bytes, a Duration.
    const register = 'trellis.registry.v1.RegistryService/Register';
    div = form(register, null);
    const add = (path) => row(div, path).querySelector(':scope > div > .tf-add').click();
    add('grpcServices'); add('grpcServices');
    set(div, 'grpcServices[0]', 'a.A');
    set(div, 'grpcServices[1]', 'b.B');
    row(div, 'grpcServices').querySelector('.tf-remove').click();
    check('removing an item renumbers the rest', at(div, 'grpcServices[0]').value === 'b.B'
      && !at(div, 'grpcServices[1]'), row(div, 'grpcServices').innerHTML);
    add('metadata'); add('metadata');
    set(div, 'metadata[0].key', 'zone'); set(div, 'metadata[0].value', 'eu');
    set(div, 'metadata[1].key', 'zone'); set(div, 'metadata[1].value', 'us');
    r = TrellisForm.collect(div);
    check('a map key used twice is refused', same(r, { ok: false, field: 'metadata[1].key',
      message: 'metadata[1].key: the key "zone" is used twice' }), r);
    set(div, 'metadata[1].key', 'rack');
    set(div, 'leaseTtl', '5');
    r = TrellisForm.collect(div);
    check('a Duration without its unit is refused', r.field === 'leaseTtl' && /like 1.5s/.test(r.message), r);
    set(div, 'leaseTtl', '5s');
    add('fileDescriptors');
    set(div, 'fileDescriptors[0]', '%%');
    r = TrellisForm.collect(div);
    check('bytes must be base64', r.field === 'fileDescriptors[0]' && /not base64/.test(r.message), r);
    set(div, 'fileDescriptors[0]', 'AAAA');
    set(div, 'health', 'SERVING_STATUS_SERVING');
    r = TrellisForm.collect(div);
    check('lists and maps collect', same(r, { ok: true, value: { grpcServices: ['b.B'], metadata: { zone: 'eu', rack: 'us' },
      health: 'SERVING_STATUS_SERVING', leaseTtl: '5s', fileDescriptors: ['AAAA'] } }), r);
    bodies[register] = r.value;

    // Recursion, a map of messages, a oneof, an optional field.
    const plant = 'acme.Tree/Plant';
    div = form(plant, null);
    check('a oneof starts at none', div.querySelector('input[type=radio][value=""]').checked
      && !at(div, 'label') && !at(div, 'at'), div.innerHTML.length);
    div.querySelector('input[type=radio][value="at"]').click();
    set(div, 'at', 'tomorrow');
    r = TrellisForm.collect(div);
    check('a chosen oneof member is checked', r.field === 'at' && /RFC 3339/.test(r.message), r);
    set(div, 'at', '2026-12-02T10:00:00Z');
    set(div, 'limit', '0');
    add('children');
    set(div, 'children[0].name', 'kid');
    check('nested items build their own fields lazily', at(div, 'children[0].name')
      && !div.querySelector('[data-field^="children[0].children[0]"]'), div.innerHTML.length);
    add('children[0].children');
    check('rows are found by path', row(div, 'children[0].children[0].limit') !== null, div.innerHTML.length);
    set(div, 'children[0].children[0].limit', '-3');
    add('byName');
    set(div, 'byName[0].key', 'x');
    set(div, 'byName[0].value.name', 'ex');
    r = TrellisForm.collect(div);
    check('recursive messages, maps of messages, oneofs and optional zero collect', same(r, { ok: true, value: {
      children: [{ name: 'kid', children: [{ limit: -3 }] }], byName: { x: { name: 'ex' } },
      at: '2026-12-02T10:00:00Z', limit: 0 } }), r);
    bodies[plant] = r.value;
    const tree = { name: 'root', children: [{ name: 'c', children: [{ name: 'gc', label: 'l' }] }],
      byName: { k: { limit: 2 } }, at: '2026-12-02T10:00:00Z', limit: 5 };
    r = TrellisForm.collect(form(plant, tree));
    check('a recursive initial value comes back unchanged', same(r, { ok: true, value: tree }), r);

    // A singular nested message starts unset behind a set/clear toggle.
    const deliver = 'trellis.events.v1.EventSubscriberService/Deliver';
    div = form(deliver, null);
    const toggle = row(div, 'event').querySelector(':scope > fieldset > .tf-toggle');
    check('a nested message starts unset', toggle.textContent === 'set' && !at(div, 'event.id')
      && same(TrellisForm.collect(div), { ok: true, value: {} }), div.innerHTML);
    toggle.click();
    check('set builds its fields', toggle.textContent === 'clear' && at(div, 'event.id')
      && same(TrellisForm.collect(div), { ok: true, value: { event: {} } }), div.innerHTML.length);
    set(div, 'event.sequence', '-1');
    r = TrellisForm.collect(div);
    check('a negative uint64 is refused', same(r, { ok: false, field: 'event.sequence',
      message: 'event.sequence: "-1" is negative; uint64 takes 0 to 18446744073709551615' }), r);
    set(div, 'event.sequence', '18446744073709551615');
    set(div, 'event.payload', '{"userId": "u1"}');
    r = TrellisForm.collect(div);
    check('an Any needs its @type', r.field === 'event.payload' && /@type/.test(r.message)
      && at(div, 'event.payload').tagName === 'TEXTAREA', r);
    const payload = { '@type': 'type.googleapis.com/telco.user.v1.GetUserRequest', userId: 'u1' };
    set(div, 'event.payload', JSON.stringify(payload));
    r = TrellisForm.collect(div);
    check('a nested message collects', same(r, { ok: true, value: { event: {
      payload, sequence: '18446744073709551615' } } }), r);
    bodies[deliver] = r.value;
    toggle.click();
    check('clear unsets it', !at(div, 'event.id') && same(TrellisForm.collect(div), { ok: true, value: {} }),
      div.innerHTML.length);

    // A client-streaming method has no form.
    div = form('trellis.registry.v1.RegistryService/KeepAlive', null);
    r = TrellisForm.collect(div);
    check('client streaming says why, with no inputs', div.querySelector('p.unsupported')
      && !div.querySelector('input, select, textarea') && r.ok === false && /grpcurl/.test(r.message), r);
  } catch (e) {
    check('no exception', false, String(e && e.stack || e));
  }
  document.getElementById('result').textContent = JSON.stringify({ checks, bodies });
})();
