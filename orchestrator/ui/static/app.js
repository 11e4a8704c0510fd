// The inspector's only script: the live stream, the time-travel slider, what-if's file box.
// Pages work without it; nothing is fetched from outside this machine.
"use strict";

(function () {
  const body = document.body;
  const session = body.dataset.session || null;
  const headEl = document.getElementById("head");
  const liveEl = document.getElementById("live");

  async function fragment(url, target) {
    const reply = await fetch(url, { credentials: "same-origin" });
    if (reply.ok) target.innerHTML = await reply.text();
    return reply.ok;
  }

  // Live: new events arrive over server-sent events; a session page redraws its timeline.
  let redraw = null;
  function follow() {
    const after = body.dataset.head || "0";
    const stream = new EventSource("/api/stream?after=" + encodeURIComponent(after));
    stream.onopen = () => liveEl && liveEl.classList.add("on");
    stream.onerror = () => liveEl && liveEl.classList.remove("on");
    stream.onmessage = (message) => {
      const record = JSON.parse(message.data);
      body.dataset.head = String(record.position);
      if (headEl) headEl.textContent = String(record.position);
      if (session && record.session_id === session && !redraw) {
        redraw = setTimeout(async () => {
          redraw = null;
          const base = "/sessions/" + encodeURIComponent(session);
          await fragment(base + "/timeline", document.getElementById("timeline"));
          growSlider(base);
        }, 50);
      }
    };
  }
  if (typeof EventSource !== "undefined") follow();

  // Time travel: the slider's stops are the session's positions.
  const slider = document.getElementById("slider");
  let marks = [];
  async function showStop(base) {
    document.getElementById("stop").textContent = slider.value;
    await fragment(base + "/at?index=" + slider.value, document.getElementById("travel"));
    const shown = document.querySelector("#travel .travel");
    if (shown) document.getElementById("position").textContent = shown.dataset.position;
  }
  async function growSlider(base) {
    // A new event of the session adds a stop; follow it if the slider was at the end.
    const atEnd = Number(slider.value) === Number(slider.max);
    const reply = await fetch(base + "/at", { credentials: "same-origin" });
    if (!reply.ok) return;
    const holder = document.createElement("div");
    holder.innerHTML = await reply.text();
    const last = holder.querySelector(".travel");
    if (!last) return;
    slider.max = last.dataset.index;
    if (atEnd) {
      slider.value = slider.max;
      await showStop(base);
    }
  }
  if (slider && session) {
    const base = "/sessions/" + encodeURIComponent(session);
    slider.addEventListener("input", () => showStop(base));
    showStop(base);
    const mark = (which) => () => {
      marks[which] = Number(slider.value);
      const shown = marks.map((m, i) => (m === undefined ? "" : "AB"[i] + "=" + m)).join(" ");
      document.getElementById("marks").textContent = shown;
      if (marks[0] !== undefined && marks[1] !== undefined) {
        fragment(base + "/diff?a=" + marks[0] + "&b=" + marks[1], document.getElementById("diff"));
      }
    };
    document.getElementById("mark-a").addEventListener("click", mark(0));
    document.getElementById("mark-b").addEventListener("click", mark(1));
  }

  // What-if: a chosen file is read into the text box (it is posted as text).
  const file = document.getElementById("config-file");
  if (file) {
    file.addEventListener("change", async () => {
      if (file.files.length) document.getElementById("config").value = await file.files[0].text();
    });
  }
})();
