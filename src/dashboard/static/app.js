// Live parts of the dashboard's pages. The server renders each page's
// live part (#live) and pushes it again, re-rendered, over server-sent
// events whenever the registry, the metrics or the configuration change;
// this swaps it in. Filters live in the URL, so a view can be shared.
(function () {
  'use strict';
  const live = document.getElementById('live');
  const connection = document.getElementById('connection');
  let source = null;

  function setState(state, title) {
    if (!connection) return;
    connection.dataset.state = state;
    connection.textContent = state === 'live' ? 'live' : 'reconnecting…';
    connection.title = title;
  }

  function connect() {
    if (!live || !live.dataset.src) return;
    if (source) source.close();
    source = new EventSource(live.dataset.src);
    source.addEventListener('live', (event) => {
      live.innerHTML = event.data;
      setState('live', 'live updates');
      document.dispatchEvent(new CustomEvent('trellis:live'));
    });
    source.addEventListener('open', () => setState('live', 'live updates'));
    // EventSource reconnects by itself; say so meanwhile.
    source.addEventListener('error', () =>
      setState('lost', 'the dashboard cannot be reached; retrying'));
  }

  const filters = document.getElementById('filters');
  if (filters && live) {
    const apply = () => {
      const params = new URLSearchParams(new FormData(filters));
      for (const [k, v] of [...params]) if (!v) params.delete(k);
      const query = params.toString() ? '?' + params.toString() : '';
      history.replaceState(null, '', location.pathname + query);
      const base = live.dataset.src.split('?')[0];
      live.dataset.src = base + query;
      connect();
    };
    filters.addEventListener('input', apply);
    filters.addEventListener('change', apply);
    filters.addEventListener('submit', (e) => { e.preventDefault(); apply(); });
  }
  connect();
})();
