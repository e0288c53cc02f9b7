// Preselects the browser's time zone in a zone picker that has no choice yet
// (data-browser-zone="preselect"); a saved choice is left alone. Without JavaScript the plain
// select still works, starting at UTC.
(function () {
  var zone;
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { return; }
  if (!zone) { return; }
  var pickers = document.querySelectorAll('select[data-browser-zone="preselect"]');
  for (var i = 0; i < pickers.length; i++) {
    var option = pickers[i].querySelector('option[value="' + zone.replace(/"/g, '') + '"]');
    if (option) { pickers[i].value = zone; }
  }
})();
