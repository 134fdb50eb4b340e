// The method console: a form built from the registered contract
// (/api/schema, drawn by form.js), sent through the dashboard to the
// edge under the operator's credential (/api/call), the answer shown as it
// arrives. The method and the request body live in the URL (?method=,
// &body=), so a prepared call can be shared; the credential never does:
// it stays in this tab's sessionStorage.
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const form = $('console');
  if (!form) return;
  const select = $('method');
  const container = $('form');
  const send = $('send');
  const edge = form.dataset.edge;
  const ca = form.dataset.ca;
  const STORE = 'trellis.credential';
  let schema = null;
  let fingerprint = null;

  // ----- credential -----
  function stored() {
    try { return JSON.parse(sessionStorage.getItem(STORE) || 'null'); } catch (_) { return null; }
  }
  function authHeaders(c) {
    if (!c) return {};
    return c.kind === 'bearer' ? { authorization: 'Bearer ' + c.value } : { 'x-api-key': c.value };
  }
  function showAuth() {
    const c = stored();
    $('signed-out').hidden = !!c;
    $('signed-in').hidden = !c;
    if (c) $('signed-in-kind').textContent = c.kind === 'bearer' ? 'JWT' : 'API key';
    send.disabled = !(c && schema && schema.supported && edge);
    send.title = c ? '' : 'Sign in first: the console is read-only without a credential the edge accepts';
  }
  $('sign-in').addEventListener('click', async () => {
    const c = { kind: $('credential-kind').value, value: $('credential').value.trim() };
    $('auth-error').textContent = '';
    if (!c.value) { $('auth-error').textContent = 'Enter an API key or a JWT.'; return; }
    try {
      const r = await fetch('/api/sign-in', { method: 'POST', headers: authHeaders(c) });
      const answer = await r.json();
      if (!r.ok) { $('auth-error').textContent = answer.error || ('HTTP ' + r.status); return; }
      sessionStorage.setItem(STORE, JSON.stringify(c));
      $('credential').value = '';
      showAuth();
    } catch (e) {
      $('auth-error').textContent = 'The dashboard cannot be reached: ' + e;
    }
  });
  $('sign-out').addEventListener('click', () => { sessionStorage.removeItem(STORE); showAuth(); });

  // ----- URL state -----
  function urlState() {
    const p = new URLSearchParams(location.search);
    let body = null;
    if (p.get('body')) { try { body = JSON.parse(p.get('body')); } catch (_) { body = null; } }
    return { method: p.get('method') || '', body };
  }
  function setUrl(method, body) {
    const p = new URLSearchParams();
    if (method) p.set('method', method);
    if (body && Object.keys(body).length) p.set('body', JSON.stringify(body));
    const q = p.toString();
    history.replaceState(null, '', location.pathname + (q ? '?' + q : ''));
    const live = $('live');
    if (live) live.dataset.src = '/live/console' + (method ? '?method=' + encodeURIComponent(method) : '');
  }

  // ----- the form -----
  async function load(method, body) {
    schema = null;
    container.textContent = '';
    $('form-error').textContent = '';
    showAuth();
    copies(method, body || {});
    if (!method) return;
    container.textContent = 'Reading the contract…';
    try {
      const r = await fetch('/api/schema?method=' + encodeURIComponent(method));
      const answer = await r.json();
      container.textContent = '';
      if (!r.ok) { $('form-error').textContent = answer.error; return; }
      schema = answer;
      window.TrellisForm.render(container, schema, body);
    } catch (e) {
      container.textContent = '';
      $('form-error').textContent = 'The contract cannot be read: ' + e;
    }
    showAuth();
  }
  select.addEventListener('change', () => {
    setUrl(select.value, null);
    document.dispatchEvent(new CustomEvent('trellis:reconnect'));
    load(select.value, null);
  });
  container.addEventListener('input', () => {
    const r = schema && window.TrellisForm.collect(container);
    if (r && r.ok) copies(select.value, r.value);
  });
  $('share').addEventListener('click', () => {
    const r = schema && window.TrellisForm.collect(container);
    setUrl(select.value, r && r.ok ? r.value : null);
  });

  // A new registration of the service may bring a new contract: rebuild
  // the form, keeping what was typed.
  document.addEventListener('trellis:live', () => {
    const state = $('contract-state');
    if (!state || state.dataset.method !== select.value) return;
    const now = state.dataset.fingerprint;
    if (fingerprint !== null && now !== fingerprint && schema) {
      const r = window.TrellisForm.collect(container);
      load(select.value, r.ok ? r.value : null);
    }
    fingerprint = now;
  });

  // ----- copying the call -----
  function quote(text) { return "'" + String(text).replace(/'/g, "'\\''") + "'"; }
  function copies(method, body) {
    const tls = edge && edge.startsWith('https://');
    const hostport = edge ? edge.replace(/^https?:\/\//, '') : 'EDGE:PORT';
    const c = stored();
    const header = c && c.kind === 'bearer' ? '"authorization: Bearer $TRELLIS_JWT"' : '"x-api-key: $TRELLIS_API_KEY"';
    const data = quote(JSON.stringify(body));
    const m = method || 'package.Service/Method';
    $('copy-grpcurl').textContent = 'grpcurl ' + (tls ? '-cacert ' + quote(ca) : '-plaintext') +
      ' -H ' + header + ' -reflect-header ' + header + ' -d ' + data + ' ' + hostport + ' ' + m;
    $('copy-buf').textContent = 'buf curl --protocol grpc ' + (tls ? '--cacert ' + quote(ca) : '--http2-prior-knowledge') +
      ' -H ' + header + ' --reflect-header ' + header + ' -d ' + data + ' ' + (edge || 'http://EDGE:PORT') + '/' + m;
    $('copy-curl').textContent = 'curl -sS ' + (tls ? '--cacert ' + quote(ca) + ' ' : '') +
      "-H 'content-type: application/json' -H " + header + ' -d ' + data + ' ' + (edge || 'http://EDGE:PORT') + '/' + m;
  }

  // ----- calling -----
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    $('form-error').textContent = '';
    const c = stored();
    if (!c) { $('form-error').textContent = 'Sign in first.'; return; }
    const r = window.TrellisForm.collect(container);
    if (!r.ok) { $('form-error').textContent = r.field + ': ' + r.message; return; }
    setUrl(select.value, r.value);
    copies(select.value, r.value);
    $('status').textContent = '…';
    $('status-message').textContent = '';
    $('timing').textContent = '';
    $('response').textContent = '';
    $('trailers').textContent = '';
    send.disabled = true;
    const started = performance.now();
    try {
      const answer = await fetch('/api/call', {
        method: 'POST',
        headers: Object.assign({ 'content-type': 'application/json' }, authHeaders(c)),
        body: JSON.stringify({ method: select.value, body: r.value }),
      });
      if (!answer.ok) {
        const e = await answer.json().catch(() => ({ error: 'HTTP ' + answer.status }));
        $('status').textContent = 'not sent';
        $('form-error').textContent = (e.field ? e.field + ': ' : '') + e.error;
        return;
      }
      const reader = answer.body.getReader();
      const decoder = new TextDecoder();
      let buffered = '';
      let messages = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffered.indexOf('\n')) >= 0) {
          const item = JSON.parse(buffered.slice(0, newline));
          buffered = buffered.slice(newline + 1);
          if ('message' in item) {
            messages += 1;
            $('response').textContent += (messages > 1 ? '\n' : '') + JSON.stringify(item.message, null, 2);
          } else if (item.end) {
            const e = item.end;
            $('status').textContent = e.status;
            $('status').dataset.code = e.code;
            $('status-message').textContent = e.message;
            $('timing').textContent = '· first byte ' + e.first_byte_ms.toFixed(1) + ' ms, total ' +
              e.elapsed_ms.toFixed(1) + ' ms at the dashboard (' + (performance.now() - started).toFixed(0) +
              ' ms in the browser)' + (messages > 1 ? ', ' + messages + ' messages' : '');
            const lines = Object.entries(e.headers).map(([k, v]) => k + ': ' + v);
            const trailers = Object.entries(e.trailers).map(([k, v]) => 'trailer ' + k + ': ' + v);
            $('trailers').textContent = lines.concat(trailers).join('\n') || '(none)';
            if (e.code === 16) { sessionStorage.removeItem(STORE); showAuth(); }
          }
        }
      }
    } catch (e) {
      $('status').textContent = 'failed';
      $('status-message').textContent = String(e);
    } finally {
      showAuth();
    }
  });

  const initial = urlState();
  if (initial.method) select.value = initial.method;
  load(select.value, initial.body);
})();
