// The console's form builder is not in this build yet: every method is
// sent with an empty body ({}).
window.TrellisForm = {
  render(container) { container.textContent = 'Forms are not built yet: the call is sent with {}.'; },
  collect() { return { ok: true, value: {} }; },
};
