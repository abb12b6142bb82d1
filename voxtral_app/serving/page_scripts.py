"""What the page runs in the browser: its scripts and its style.

Written against fastrtc 0.0.34's WebRTC component (its DOM and its logging) and gradio 5.50's
page; voxtral_app/compat/fastrtc.py refuses any other fastrtc version at import.
"""

from .page_sessions import PAGE_TOKEN_HEADER

# The page's own secret (serving/page_sessions.py): 192 random bits made once per page load, sent with each
# same-origin gradio request, to which the server binds the page's gradio session on its first request.
# gradio 5.50's client sends queue/join, queue/data (a fetch stream, not EventSource), heartbeat,
# component_server, run/predict and upload through the global fetch, looked up at each call. Only its
# heartbeat starts before these scripts run (Client.connect opens it; the head comes after): the server
# never binds a session on a heartbeat, and this script's later requests bind it. XMLHttpRequest (hls.js,
# for streamed audio or video outputs, which this page has none of) does not carry it.
PAGE_TOKEN = """<script>
(() => {
  if (window.voxtralPageFetch) return;  // gradio adds the head again after a dev-mode reload
  window.voxtralPageFetch = true;
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  const token = btoa(String.fromCharCode(...bytes)).replace(/[+]/g, "-").replace(/[/]/g, "_");
  const pageFetch = window.fetch;
  const ours = (input) => {  // the page's own gradio routes: the token never leaves for another origin
    try {
      const url = new URL(input instanceof Request ? input.url : input, location.href);
      return url.origin === location.origin && url.pathname.includes("/gradio_api/");
    } catch (error) {
      return false;  // fetch itself rejects it
    }
  };
  window.fetch = (input, init) => {
    if (ours(input)) {
      const headers = new Headers(init && init.headers !== undefined ? init.headers
                                  : input instanceof Request ? input.headers : undefined);
      headers.set("%s", token);
      init = {...init, headers};
    }
    return pageFetch(input, init);
  };
})();
</script>""" % PAGE_TOKEN_HEADER
# fastrtc's WebRTC component logs every data-channel message and connection state change: 3 lines per
# chat update (83 lines in 30 s with one short reply from the tiny model; hundreds with real replies).
# The page keeps warnings and errors; `python app.py --debug` keeps all.
QUIET_CONSOLE = """<script>
for (const level of ["log", "debug", "info"]) console[level] = () => {};
</script>"""
# The page works offline: fastrtc's microphone fetches a notification sound from huggingface.co on
# every page load (for stop words, which this app does not use), so remote sounds are not loaded.
OFFLINE = """<script>
const LocalAudio = window.Audio;
window.Audio = function (src) { return new LocalAudio(/^https?:/.test(src || "") ? undefined : src); };
window.Audio.prototype = LocalAudio.prototype;
</script>"""

# A level meter that follows the person's own microphone: the page keeps the stream fastrtc asks the
# browser for and measures it with WebAudio, so the meter moves as they speak, before any server round trip.
LEVEL_METER = """<script>
(() => {
  const media = navigator.mediaDevices;
  if (!media || !media.getUserMedia) return;
  const getUserMedia = media.getUserMedia.bind(media);
  let context, generation = 0;
  const meter = (stream) => {
    const mine = ++generation;
    try {
      context = context || new AudioContext();
      context.resume();
      const analyser = context.createAnalyser();
      analyser.fftSize = 1024;
      context.createMediaStreamSource(stream).connect(analyser);
      const samples = new Float32Array(analyser.fftSize);
      const timer = setInterval(() => {
        const live = mine === generation && stream.getAudioTracks().some((t) => t.readyState === "live");
        analyser.getFloatTimeDomainData(samples);
        let sum = 0;
        for (const x of samples) sum += x * x;
        const level = live ? Math.min(1, 2 * Math.sqrt(Math.sqrt(sum / samples.length))) : 0;  // ~ loudness
        const meter = document.querySelector("#voice-meter .meter");
        if (meter) {
          meter.style.setProperty("--level", level.toFixed(3));
          meter.setAttribute("aria-valuenow", Math.round(100 * level));
        }
        if (!live) clearInterval(timer);
      }, 50);
    } catch (error) {
      console.warn("no level meter:", error);
    }
  };
  media.getUserMedia = async (constraints) => {
    const stream = await getUserMedia(constraints);
    if (stream.getAudioTracks().length) meter(stream);
    return stream;
  };
})();
</script>"""
# The voice loop's state and the meter. The cue is a dot: grey while nobody talks, green and pulsing
# while the person speaks, amber while Voxtral thinks, blue while it answers, red once the call ended.
CSS = """
#voice-state .voice-state {display: flex; align-items: center; gap: .5em; font-size: var(--text-lg);}
#voice-state .cue {width: .9em; height: .9em; border-radius: 50%; background: var(--neutral-400);}
#voice-state [data-state=listening] .cue {background: #86efac;}
#voice-state [data-state=hearing] .cue {background: #16a34a; animation: voice-pulse 1s infinite;}
#voice-state [data-state=thinking] .cue {background: #f59e0b; animation: voice-pulse .6s infinite;}
#voice-state [data-state=speaking] .cue {background: #2563eb;}
#voice-state [data-state=ended] .cue {background: #dc2626;}
@keyframes voice-pulse {50% {opacity: .35; transform: scale(.8);}}
#voice-meter .meter {height: 8px; border-radius: 4px; background: var(--border-color-primary); overflow: hidden;}
#voice-meter .meter > div {height: 100%; background: #16a34a; transform-origin: left;
  transform: scaleX(var(--level, 0)); transition: transform 50ms linear;}
#voice-state .pending, #voice-state .wrap {display: none !important;}
.toast-body:has(.toast-text:empty) {display: none !important;}  /* fastrtc's toast for a call's end: the chat says it */
#conversation sub {font-size: var(--text-sm); opacity: .75; vertical-align: baseline;}
@media (max-width: 640px) {  /* a phone: the chat and the talk button first, settings folded below */
  #page-intro p {display: none;}
  #page-intro h1 {font-size: var(--text-xl); margin: 0;}
  #engine-status {font-size: var(--text-sm);}
  #talk-row {flex-direction: column-reverse; gap: 8px;}
  #talk-row > div {gap: 8px;}
  #conversation {height: 40vh !important; max-height: 40vh !important;}
  #microphone .audio-container {height: 130px !important; min-height: 0 !important;}
}
"""

# One click starts talking. fastrtc's microphone first shows a "Click to Access Microphone" button and,
# once the browser grants the microphone, a record button: that first button is renamed "Start talking",
# and the record button (fastrtc's button_labels: "Start talking" too) is pressed for the person as soon
# as it appears after their click. The click is the user gesture the browser needs for the microphone.
# fastrtc names the record button "start stream" whatever it shows, and some of its icons have no name:
# each control gets the name of what it does. Stop shows `paused` until the next call; on a phone the
# settings start folded.
ONE_CLICK = """() => {
  const microphone = document.getElementById("microphone");
  if (!microphone) return;
  let clicked = false;
  const paused = () => {
    const state = document.querySelector("#voice-state .voice-state");
    if (!state) return;
    state.dataset.state = "paused";
    state.querySelector(".words").textContent = "paused";
  };
  const tidy = () => {
    const ask = microphone.querySelector('[title="grant webcam access"] button');
    if (ask && !ask.dataset.oneClick) {
      ask.dataset.oneClick = "1";
      const texts = document.createTreeWalker(ask, NodeFilter.SHOW_TEXT);
      for (let node; (node = texts.nextNode());) if (node.data.trim()) node.data = "Start talking";
      ask.addEventListener("click", () => { clicked = true; });
    }
    const record = microphone.querySelector('button[aria-label="start stream"], button[data-record]');
    if (record) {
      record.dataset.record = "1";
      record.setAttribute("aria-label", record.textContent.trim() || "Start talking");
    }
    for (const button of microphone.querySelectorAll("button:not([aria-label])")) {
      if (!button.textContent.trim()) button.setAttribute("aria-label", button.title || "Microphone settings");
    }
    if (clicked && record && /^Start/.test(record.textContent.trim())) {
      clicked = false;
      record.click();
    }
  };
  microphone.addEventListener("click", (event) => {  // capture: before fastrtc's handler relabels the button
    const record = event.target.closest("button[data-record]");
    if (record && /^Stop/.test(record.textContent.trim())) paused();
  }, true);
  new MutationObserver(tidy).observe(microphone, {childList: true, subtree: true, characterData: true});
  tidy();
  let tries = 0;
  const fold = () => {  // the accordion takes clicks once gradio has mounted it
    const label = document.querySelector("#settings .label-wrap");
    if (label && label.classList.contains("open")) label.click();
    if (tries++ < 20 && (!label || label.classList.contains("open"))) setTimeout(fold, 250);
  };
  if (window.matchMedia("(max-width: 640px)").matches) fold();
}"""
