/* AI API Broker: small progressive enhancements. No inline scripts anywhere; pages work without this file.
 *
 * - Copy buttons: any <button data-copy-target="ID"> copies the text of the element with that id and says
 *   "Copied". Buttons may ship with the `hidden` attribute so visitors without JavaScript never see a dead
 *   button; this file reveals them.
 * - Code tabs: a [data-tabs] container of .code-panel[data-tab-label] sections (all visible without
 *   JavaScript) becomes an ARIA tab list: click or arrow keys to switch; the choice of language is remembered
 *   across the page.
 * - Wide tables: a .table-wrap that scrolls sideways becomes focusable so keyboard users can scroll it.
 * Works with content that htmx swaps in (listeners are delegated; setup reruns after htmx:load).
 */
(function () {
  "use strict";

  var live;

  function announce(message) {
    if (!live) {
      live = document.createElement("div");
      live.className = "visually-hidden";
      live.setAttribute("role", "status");
      live.setAttribute("aria-live", "polite");
      document.body.appendChild(live);
    }
    live.textContent = "";
    window.setTimeout(function () {
      live.textContent = message;
    }, 50);
  }

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (e) {
      ok = false;
    }
    document.body.removeChild(area);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy failed"));
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () {
        return fallbackCopy(text);
      });
    }
    return fallbackCopy(text);
  }

  function onCopyClick(event) {
    var button = event.target.closest("button[data-copy-target]");
    if (!button) {
      return;
    }
    var target = document.getElementById(button.getAttribute("data-copy-target"));
    if (!target) {
      return;
    }
    var text = "value" in target && target.tagName !== "BUTTON" ? target.value : target.textContent;
    if (!button.hasAttribute("data-label")) {
      button.setAttribute("data-label", button.textContent);
    }
    var label = button.getAttribute("data-label");
    copyText(text).then(
      function () {
        button.textContent = "Copied";
        button.classList.add("copied");
        announce("Copied to the clipboard");
      },
      function () {
        button.textContent = "Press Ctrl+C";
        announce("Could not copy: select the text and copy it yourself");
        var range = document.createRange();
        range.selectNodeContents(target);
        var selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
      }
    );
    window.clearTimeout(button._copyTimer);
    button._copyTimer = window.setTimeout(function () {
      button.textContent = label;
      button.classList.remove("copied");
    }, 2000);
  }

  var tabCount = 0;

  function selectTab(tabs, index, focus) {
    tabs.forEach(function (tab, i) {
      var selected = i === index;
      tab.setAttribute("aria-selected", selected ? "true" : "false");
      tab.tabIndex = selected ? 0 : -1;
      document.getElementById(tab.getAttribute("aria-controls")).hidden = !selected;
    });
    if (focus) {
      tabs[index].focus();
    }
  }

  function preferredLabel() {
    try {
      return window.sessionStorage.getItem("broker.codeTab");
    } catch (e) {
      return null;
    }
  }

  function rememberLabel(label) {
    try {
      window.sessionStorage.setItem("broker.codeTab", label);
    } catch (e) {
      /* storage may be off: the choice just is not remembered */
    }
  }

  function enhanceTabs(container) {
    if (container.classList.contains("tabs-enhanced")) {
      return;
    }
    var panels = Array.prototype.filter.call(container.children, function (el) {
      return el.hasAttribute("data-tab-label");
    });
    if (panels.length < 2) {
      return;
    }
    tabCount += 1;
    var list = document.createElement("div");
    list.className = "tablist";
    list.setAttribute("role", "tablist");
    list.setAttribute("aria-label", "Example language");
    var tabs = panels.map(function (panel, i) {
      if (!panel.id) {
        panel.id = "tabpanel-" + tabCount + "-" + i;
      }
      var tab = document.createElement("button");
      tab.type = "button";
      tab.id = panel.id + "-tab";
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-controls", panel.id);
      tab.textContent = panel.getAttribute("data-tab-label");
      panel.setAttribute("role", "tabpanel");
      panel.setAttribute("aria-labelledby", tab.id);
      panel.removeAttribute("aria-label");
      list.appendChild(tab);
      return tab;
    });
    list.addEventListener("click", function (event) {
      var tab = event.target.closest("[role=tab]");
      if (tab) {
        var index = tabs.indexOf(tab);
        selectTab(tabs, index, false);
        rememberLabel(tab.textContent);
      }
    });
    list.addEventListener("keydown", function (event) {
      var index = tabs.indexOf(document.activeElement);
      if (index < 0) {
        return;
      }
      var next = null;
      if (event.key === "ArrowRight") {
        next = (index + 1) % tabs.length;
      } else if (event.key === "ArrowLeft") {
        next = (index - 1 + tabs.length) % tabs.length;
      } else if (event.key === "Home") {
        next = 0;
      } else if (event.key === "End") {
        next = tabs.length - 1;
      }
      if (next !== null) {
        event.preventDefault();
        selectTab(tabs, next, true);
        rememberLabel(tabs[next].textContent);
      }
    });
    container.insertBefore(list, container.firstChild);
    container.classList.add("tabs-enhanced");
    var wanted = preferredLabel();
    var start = 0;
    tabs.forEach(function (tab, i) {
      if (tab.textContent === wanted) {
        start = i;
      }
    });
    selectTab(tabs, start, false);
  }

  function markScrollable(wrap) {
    if (wrap.scrollWidth > wrap.clientWidth + 1) {
      if (!wrap.hasAttribute("tabindex")) {
        wrap.setAttribute("tabindex", "0");
        wrap.setAttribute("data-scroll-focus", "");
        if (!wrap.hasAttribute("role")) {
          wrap.setAttribute("role", "region");
          var caption = wrap.querySelector("caption");
          wrap.setAttribute("aria-label", caption ? caption.textContent.trim() : "Table");
        }
      }
    } else if (wrap.hasAttribute("data-scroll-focus")) {
      wrap.removeAttribute("tabindex");
      wrap.removeAttribute("data-scroll-focus");
    }
  }

  function each(root, selector, fn) {
    if (root.matches && root.matches(selector)) {
      fn(root);
    }
    root.querySelectorAll(selector).forEach(fn);
  }

  function setup(root) {
    each(root, "button[data-copy-target][hidden]", function (button) {
      button.hidden = false;
    });
    each(root, "[data-tabs]", enhanceTabs);
    each(root, ".table-wrap", markScrollable);
  }

  function start() {
    document.addEventListener("click", onCopyClick);
    setup(document);
    var resizeTimer;
    window.addEventListener("resize", function () {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(function () {
        document.querySelectorAll(".table-wrap").forEach(markScrollable);
      }, 150);
    });
    document.body.addEventListener("htmx:load", function (event) {
      setup(event.target);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
